"""Engine startup: seconds from `LLM(...)` to ready on a GPU, and compiles counted on the CPU.

On CUDA, each start runs in a fresh process: `first` with an empty Triton cache (a new
TRITON_CACHE_DIR), `restart` on the cache `first` left, `eager` (enforce_eager=True) with
an empty cache again. Per start: seconds to import shardline, from LLM(...) to ready, for
the first request after (a 37-token prompt, one token) and for the whole process, and
which kernel keys came from the tuned table, were autotuned or ran a default. Issue 10's
targets: 20 s, 10 s and 10 s from LLM(...) to ready.

    python bench/startup.py                                # GPU: small-llama and the 1B model
    python bench/startup.py --table none --models small-llama --cases first
    python bench/startup.py --count                        # CPU: compiles a start would do
    python bench/startup.py --device cpu --models tiny-llama   # smoke run of the timing code

--count runs the start's warm-up (bench/start_shapes.py) with every Triton launch
recorded instead of compiled, and reports per kernel the compiles without a tuned table
(each new key compiles every candidate config its prune keeps, to time them) and with
one (one compile per key and specialization; --table FILE counts that table's hits only).
It counts as on an H100 (132 SMs, TMA: matmul's split-K choice and TMA configs, decode
attention's context splits); linear shapes a table sends to torch.matmul still count as
compiles.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Iterator
from unittest import mock

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")   # silences triton 3.9's warning

import torch

from kernel_launches import as_on_h100
from start_shapes import (E2E_1B, Limits, add_limit_args, build_model, config_dtype,
                          import_kernels, limits_from, model_config, walk_start)

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = ("small-llama", E2E_1B)
CASES = ("first", "restart", "eager")
TARGETS_S = {"first": 20.0, "restart": 10.0, "eager": 10.0}
H100_SMS = 132
PROMPT_LEN = 37


def _signature(fn: object, args: tuple, kwargs: dict, tile: dict) -> tuple:
    """What makes two launches one compiled kernel: argument specialization and launch
    options, leaving out the tile config `tile` (counted separately)."""
    from shardline.kernels._compile import specialize
    spec = specialize(fn, args, {**kwargs, **tile})
    constexprs = sorted((k, repr(v)) for k, v in spec.constexprs.items() if k not in tile)
    options = (kwargs.get("num_warps", 4), kwargs.get("num_stages", 3))
    return tuple(sorted(spec.types.items())), tuple(constexprs), tuple(sorted(spec.aligned)), \
        options


@contextlib.contextmanager
def recording_launches(sms: int, counts: Counter | None = None
                       ) -> Iterator[dict[str, dict[str, set]]]:
    """Within it, Triton kernels on CPU tensors record their launches instead of running:
    kernel -> key ("" for an untuned kernel) -> launch signatures; `counts`, if given,
    gains one per launch of each kernel."""
    import triton
    from shardline.kernels import _tuned, dispatch

    seen: dict[str, dict[str, set]] = {}

    counts = Counter() if counts is None else counts

    def plain_run(fn, *args, grid, warmup, **kwargs):
        counts[fn.__name__] += 1
        seen.setdefault(fn.__name__, {}).setdefault("", set()).add(
            _signature(fn, args, kwargs, {}))

    def tuned_launch(kernel, args, grid, warmup, kwargs, config):
        counts[kernel.name] += 1
        seen.setdefault(kernel.name, {}).setdefault(kernel.table_key(args, kwargs), set()).add(
            _signature(kernel.fn, args, kwargs, config.kwargs))

    env = {"SHARDLINE_FORCE_TRITON": "1", _tuned.TABLE_ENV: "none"}
    with mock.patch.dict(os.environ, env), \
            mock.patch.object(triton.runtime.JITFunction, "run", plain_run), \
            mock.patch.object(_tuned.TunedKernel, "_launch", tuned_launch), \
            as_on_h100(sms):
        dispatch.reset_triton_choice()
        _tuned.reset()
        _tuned.set_autotuning(False)
        try:
            yield seen
        finally:
            dispatch.reset_triton_choice()
            _tuned.reset()


def count_compiles(model: str, dtype_name: str, limits: Limits, table_path: str | None,
                   sms: int) -> dict:
    """Per kernel: keys, specializations and compiles without and with a tuned table."""
    from shardline.kernels import _tuned
    import_kernels()
    config = model_config(model, torch.bfloat16)
    dtype = config_dtype(config, dtype_name)
    table = _tuned.read_table(table_path) if table_path else None
    net = build_model(config, dtype, torch.device("cpu"), random_weights=False)
    with recording_launches(sms) as seen:
        walk_start(net, config, limits, torch.device("cpu"))
        reached = {name: dict(k.reached) for name, k in _tuned.KERNELS.items()}
    rows = []
    for name, keys in sorted(seen.items()):
        if name not in reached:
            compiles = sum(len(signatures) for signatures in keys.values())
            rows.append({"kernel": name, "tuned": False, "keys": 0, "table_hits": 0,
                         "specializations": compiles,
                         "without_table": compiles, "with_table": compiles})
            continue
        in_table = table.kernels.get(name, {}) if table is not None else None
        without = with_table = hits = 0
        binaries = set()
        for key, signatures in keys.items():
            autotuned = reached[name][key].candidates + len(signatures) - 1
            without += autotuned
            if in_table is None:
                with_table += len(signatures)
            elif key in in_table:
                hits += 1
                binaries |= {(str(in_table[key]), s) for s in signatures}
            else:
                with_table += autotuned
        rows.append({"kernel": name, "tuned": True, "keys": len(keys), "table_hits": hits,
                     "specializations": sum(len(s) for s in keys.values()),
                     "without_table": without, "with_table": with_table + len(binaries)})
    return {"model": model, "dtype": str(dtype).removeprefix("torch."),
            "limits": asdict(limits), "kernels": rows,
            "total_without_table": sum(r["without_table"] for r in rows),
            "total_with_table": sum(r["with_table"] for r in rows)}


def print_counts(report: dict) -> None:
    print(f"{report['model']} ({report['dtype']}): compiles at start, without / with the "
          f"tuned table ({report['table']})")
    print(f"{'kernel':28} {'keys':>5} {'spec.':>6} {'without':>8} {'with':>6}")
    for r in report["kernels"]:
        print(f"{r['kernel']:28} {r['keys']:5d} {r['specializations']:6d} "
              f"{r['without_table']:8d} {r['with_table']:6d}")
    print(f"{'total':28} {'':5} {'':6} {report['total_without_table']:8d} "
          f"{report['total_with_table']:6d}")


def model_dir(model: str) -> str:
    """A checkpoint directory for a start: the preset's, or the 1B bench model's."""
    if model == E2E_1B:
        from e2e_decode import LLAMA_3_2_1B, checkpoint_dir
        return checkpoint_dir(LLAMA_3_2_1B, torch.bfloat16, torch.device("cuda"))
    from shardline.presets import resolve_model
    return resolve_model(model)


def child(args: argparse.Namespace) -> None:
    """One start, in this fresh process; prints its timings as one JSON line."""
    started = time.perf_counter()
    from shardline.engine.llm import LLM
    from shardline.kernels import _tuned
    from shardline.sampling_params import SamplingParams
    imported = time.perf_counter()
    limits = limits_from(args)
    llm = LLM(args.child, dtype=args.dtype, enforce_eager=args.eager,
              max_num_seqs=limits.max_num_seqs,
              max_num_batched_tokens=limits.max_num_batched_tokens,
              block_size=limits.block_size, max_model_len=limits.max_model_len)
    ready = time.perf_counter()
    prompt = torch.randint(3, 200, (PROMPT_LEN,)).tolist()
    llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True))
    answered = time.perf_counter()
    llm.shutdown()
    sources: dict[str, dict[str, int]] = {}
    for name, kernel in _tuned.KERNELS.items():
        for reached in kernel.reached.values():
            counts = sources.setdefault(name, {})
            counts[reached.source] = counts.get(reached.source, 0) + 1
    print(json.dumps({"import_s": imported - started, "ready_s": ready - imported,
                      "first_request_s": answered - ready, "key_sources": sources}))


def run_start(model: str, directory: str, case: str, cache: str,
              args: argparse.Namespace) -> dict:
    env = dict(os.environ, TRITON_CACHE_DIR=cache, SHARDLINE_DEVICE=args.device)
    if args.table != "packaged":
        env["SHARDLINE_TUNED_TABLE"] = args.table
    command = [sys.executable, __file__, "--child", directory, "--dtype", args.dtype]
    for name, value in vars(limits_from(args)).items():
        if value is not None:
            command += ["--" + name.replace("_", "-"), str(value)]
    if case == "eager":
        command.append("--eager")
    row = {"model": model, "case": case, "target_s": TARGETS_S[case]}
    started = time.perf_counter()
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True,
                              timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return row | {"ready_s": None, "timed_out": True, "met": False,
                      "error": f"no start within {args.timeout:.0f} s"}
    if done.returncode != 0:
        return row | {"ready_s": None, "timed_out": False, "met": False,
                      "error": done.stderr[-2000:]}
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return row | result | {"process_s": time.perf_counter() - started, "timed_out": False,
                           "met": result["ready_s"] <= TARGETS_S[case]}


def time_starts(args: argparse.Namespace) -> dict:
    rows = []
    for model in args.models:
        directory = model_dir(model)
        with tempfile.TemporaryDirectory() as warm, tempfile.TemporaryDirectory() as cold:
            for case in args.cases:
                cache = cold if case == "eager" else warm
                row = run_start(model, directory, case, cache, args)
                rows.append(row)
                shown = "timed out" if row["timed_out"] else (
                    "failed" if row["ready_s"] is None else f"{row['ready_s']:.1f} s")
                print(f"{model:12} {case:8} ready {shown} (target {row['target_s']:.0f} s)",
                      flush=True)
    device = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    return {"device": device, "table": args.table,
            "limits": asdict(limits_from(args)),
            "torch": torch.__version__, "triton": __import__("triton").__version__,
            "targets_s": TARGETS_S, "results": rows}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", action="store_true",
                        help="count the compiles of a start on the CPU instead of timing")
    parser.add_argument("--models", nargs="+", default=list(MODELS),
                        help=f"presets, model directories or {E2E_1B}")
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    parser.add_argument("--dtype", default="auto", help="as LLM(dtype=...)")
    parser.add_argument("--table", default="packaged",
                        help="tuned table: 'packaged' (this GPU's shipped one), 'none', or a "
                             "file; with --count, a file or 'none' (then every key counts "
                             "as in the table)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per start")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cpu: a smoke run of the timing code (its numbers mean nothing)")
    parser.add_argument("--sms", type=int, default=H100_SMS,
                        help="--count: the SM count that matmul's split-K and decode "
                             "attention's context splits assume")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON output (default results/startup.json, or "
                             "results/startup_count.json with --count)")
    add_limit_args(parser)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--eager", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.child:
        child(args)
        return
    if args.count:
        table = None if args.table in ("none", "packaged") else args.table
        reports = []
        for model in args.models:
            report = count_compiles(model, args.dtype, limits_from(args), table, args.sms)
            report["table"] = table or "every key in it"
            print_counts(report)
            reports.append(report)
        result = {"command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
                  "sms": args.sms, "triton": __import__("triton").__version__,
                  "models": reports}
        out = args.out or RESULTS / "startup_count.json"
    else:
        if args.device == "cuda" and not torch.cuda.is_available():
            sys.exit("bench/startup.py times engine starts on a CUDA GPU and none is "
                     "visible; `--count` reports the compiles of a start on the CPU, "
                     "`--device cpu` smoke-runs the timing code.")
        result = time_starts(args)
        result["command"] = " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])
        out = args.out or RESULTS / "startup.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

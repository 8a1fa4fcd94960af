"""Engine startup: seconds from `LLM(...)` to ready on a GPU, and compiles counted on the CPU.

On CUDA, each start runs in a fresh process: `first` with an empty Triton cache (a new
TRITON_CACHE_DIR), `restart` on the cache `first` left, `eager` (enforce_eager=True) with
an empty cache again. Per start: seconds to import shardline, from LLM(...) to ready, for
the first request after (a 37-token prompt, one token) and for the whole process, and
which kernel keys came from the tuned table, were autotuned or ran a default. Issue 10's
targets: 20 s, 10 s and 10 s from LLM(...) to ready.

    python bench/startup.py                                # GPU: small-llama and the 1B model
    python bench/startup.py --table none --models small-llama --cases first --runs 1
    python bench/startup.py --count                        # CPU: compiles a start would do
    python bench/startup.py --device cpu --models tiny-llama --runs 1   # smoke run

Each case runs --runs times (a fresh pair of Triton caches per run) and reports the
median of its runs.

--count runs the start's warm-up (bench/start_shapes.py) with every Triton launch
recorded instead of compiled, and reports per kernel the compiles of three starts:
without a tuned table ("default": one config per key, the linears on torch.matmul, so
their GEMM kernels never compile); without one under SHARDLINE_AUTOTUNE=1 ("autotuned":
each key compiles every candidate config its prune keeps, to time them, and the linears
stay in Triton); and with a table: by default one that holds every key (one compile per
key and specialization); --table FILE counts that table's hits only, --table none no
table at all. It counts as on an H100 (132 SMs, TMA: matmul's split-K choice and TMA
configs, decode attention's context splits); with a table, linear shapes it sends to
torch.matmul still count as compiles.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from unittest import mock

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")   # silences triton 3.9's warning

import torch

from _files import write_json
from _h100 import H100_SMS, recording_launches
from start_shapes import (E2E_1B, Limits, add_limit_args, build_model, config_dtype,
                          import_kernels, limits_from, model_config, walk_start)

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = ("small-llama", E2E_1B)
CASES = ("first", "restart", "eager")
TARGETS_S = {"first": 20.0, "restart": 10.0, "eager": 10.0}
COLUMNS = ("default", "autotuned", "with_table")
PROMPT_LEN = 37


def walk_recorded(net, config: dict, limits: Limits, sms: int, triton_linears: bool
                  ) -> tuple[dict, dict]:
    """A start's launches recorded as on an H100: kernel -> key -> signatures, and each
    tuned kernel's key -> Reached. `triton_linears` False sends every linear to its
    torch.matmul form, as a GPU without a tuned table does."""
    from shardline.kernels import _tuned, dispatch
    linears = contextlib.ExitStack()
    if not triton_linears:
        linears.enter_context(mock.patch.object(dispatch, "_triton_linear", lambda *a: False))
        # No kernel runs in a recorded walk, so no output is worth computing: the torch
        # linears (the 1B model's at 2048 tokens took the CPU half an hour) only shape theirs.
        linears.enter_context(mock.patch.object(
            torch.nn.functional, "linear",
            lambda x, weight, bias=None: x.new_empty(*x.shape[:-1], weight.shape[0])))
    with recording_launches(sms) as seen, linears:
        walk_start(net, config, limits, torch.device("cpu"))
        reached = {name: dict(k.reached) for name, k in _tuned.KERNELS.items()}
    return seen, reached


def count_compiles(model: str, dtype_name: str, limits: Limits, table, sms: int) -> dict:
    """Per kernel: keys, specializations and compiles of a start without a tuned table
    (one config per key, linears on torch.matmul), without one under SHARDLINE_AUTOTUNE=1
    (every candidate of every key, linears in Triton) and with the tuned table `table`
    (None: a table that holds every key)."""
    import_kernels()
    config = model_config(model, torch.bfloat16)
    dtype = config_dtype(config, dtype_name)
    net = build_model(config, dtype, torch.device("cpu"), random_weights=False)
    seen, reached = walk_recorded(net, config, limits, sms, triton_linears=True)
    untuned, _ = walk_recorded(net, config, limits, sms, triton_linears=False)
    rows = []
    for name in sorted(seen.keys() | untuned.keys()):
        keys = seen.get(name, {})
        default = sum(len(signatures) for signatures in untuned.get(name, {}).values())
        specializations = sum(len(signatures) for signatures in keys.values())
        if name not in reached:
            rows.append({"kernel": name, "tuned": False, "keys": 0, "table_hits": 0,
                         "specializations": specializations, "default": default,
                         "autotuned": specializations, "with_table": specializations})
            continue
        in_table = table.kernels.get(name, {}) if table is not None else None
        autotuned = with_table = hits = 0
        binaries = set()
        for key, signatures in keys.items():
            key_autotuned = reached[name][key].candidates + len(signatures) - 1
            autotuned += key_autotuned
            if in_table is None:
                with_table += len(signatures)
            elif key in in_table:
                hits += 1
                binaries |= {(str(in_table[key]), s) for s in signatures}
            else:
                with_table += key_autotuned
        rows.append({"kernel": name, "tuned": True, "keys": len(keys), "table_hits": hits,
                     "specializations": specializations, "default": default,
                     "autotuned": autotuned, "with_table": with_table + len(binaries)})
    return {"model": model, "dtype": str(dtype).removeprefix("torch."),
            "limits": asdict(limits), "kernels": rows,
            **{f"total_{column}": sum(r[column] for r in rows) for column in COLUMNS}}


def print_counts(report: dict) -> None:
    print(f"{report['model']} ({report['dtype']}): compiles at start without a tuned table, "
          f"without one under SHARDLINE_AUTOTUNE=1, and with the table ({report['table']})")
    print(f"{'kernel':28} {'keys':>5} {'spec.':>6} {'default':>8} {'autotuned':>10} "
          f"{'table':>6}")
    for r in report["kernels"]:
        print(f"{r['kernel']:28} {r['keys']:5d} {r['specializations']:6d} {r['default']:8d} "
              f"{r['autotuned']:10d} {r['with_table']:6d}")
    print(f"{'total':28} {'':5} {'':6} {report['total_default']:8d} "
          f"{report['total_autotuned']:10d} {report['total_with_table']:6d}")


def model_dir(model: str) -> str:
    """A checkpoint directory for a start: the preset's, or the 1B bench model's."""
    if model == E2E_1B:
        from e2e_decode import LLAMA_3_2_1B, checkpoint_dir
        return checkpoint_dir(LLAMA_3_2_1B, torch.bfloat16, torch.device("cuda"))
    from shardline.presets import resolve_model
    return resolve_model(model)


class Timeline(logging.Handler):
    """The shardline logger's INFO records of a start, each with its seconds since `zero`:
    when the weights were loaded, the KV cache sized, the kernels compiled and run, the
    decode graphs captured."""

    def __init__(self, zero: float) -> None:
        super().__init__(logging.INFO)
        self.zero = zero
        self.events: list[tuple[float, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.events.append((round(time.perf_counter() - self.zero, 3), record.getMessage()))


def child(args: argparse.Namespace) -> None:
    """One start, in this fresh process; prints its timings as one JSON line."""
    started = time.perf_counter()
    timeline = Timeline(started)
    shardline_logger = logging.getLogger("shardline")
    shardline_logger.setLevel(logging.INFO)
    shardline_logger.addHandler(timeline)
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
                      "first_request_s": answered - ready, "key_sources": sources,
                      "timeline": timeline.events}))


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
    started = time.perf_counter()
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True,
                              timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"ready_s": None, "timed_out": True,
                "error": f"no start within {args.timeout:.0f} s"}
    if done.returncode != 0:
        return {"ready_s": None, "timed_out": False, "error": done.stderr[-2000:]}
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return result | {"process_s": time.perf_counter() - started, "timed_out": False}


def summarize(model: str, case: str, starts: list[dict]) -> dict:
    """One case's row: the median of each time over the runs that started, the target met
    only if every run started and the median is within it; each run under "runs"."""
    row = {"model": model, "case": case, "target_s": TARGETS_S[case]}
    done = [s for s in starts if s["ready_s"] is not None]
    failed = [s for s in starts if s["ready_s"] is None]
    if not done:
        return row | {"ready_s": None, "timed_out": failed[0]["timed_out"], "met": False,
                      "error": failed[0]["error"], "runs": starts}
    medians = {name: statistics.median(s[name] for s in done)
               for name in ("import_s", "ready_s", "first_request_s", "process_s")}
    row |= medians | {"key_sources": done[-1]["key_sources"], "timed_out": False,
                      "met": not failed and medians["ready_s"] <= TARGETS_S[case]}
    if failed:
        row["error"] = f"{len(failed)} of {len(starts)} runs failed: {failed[0]['error']}"
    return row | {"runs": starts}


def time_starts(args: argparse.Namespace, out: Path) -> None:
    """Time the starts and write `out` after each model's (a run cut off at a time limit
    keeps the models it finished)."""
    device = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    rows: list[dict] = []
    result = {"command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
              "device": device, "table": args.table, "runs": args.runs,
              "limits": asdict(limits_from(args)),
              "torch": torch.__version__, "triton": __import__("triton").__version__,
              "targets_s": TARGETS_S, "results": rows}
    for model in args.models:
        directory = model_dir(model)
        starts: dict[str, list[dict]] = {case: [] for case in args.cases}
        for _ in range(args.runs):
            with tempfile.TemporaryDirectory() as warm, tempfile.TemporaryDirectory() as cold:
                for case in args.cases:
                    cache = cold if case == "eager" else warm
                    starts[case].append(run_start(model, directory, case, cache, args))
        for case in args.cases:
            row = summarize(model, case, starts[case])
            rows.append(row)
            shown = "timed out" if row["timed_out"] else (
                "failed" if row["ready_s"] is None else f"{row['ready_s']:.1f} s")
            print(f"{model:12} {case:8} ready {shown} (target {row['target_s']:.0f} s, "
                  f"median of {len(starts[case])} runs)", flush=True)
            for seconds, message in starts[case][-1].get("timeline", []):
                print(f"    {seconds:6.1f} s  {message}", flush=True)
        write_result(result, out)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", action="store_true",
                        help="count the compiles of a start on the CPU instead of timing")
    parser.add_argument("--models", nargs="+", default=list(MODELS),
                        help=f"presets, model directories or {E2E_1B}")
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    parser.add_argument("--dtype", default="auto", help="as LLM(dtype=...)")
    parser.add_argument("--table", default=None,
                        help="tuned table: 'packaged' (this GPU's shipped one; the default), "
                             "'none' (no table) or a file; with --count: 'every' (a table "
                             "holding every key the start reaches; the default), 'none' or "
                             "a file")
    parser.add_argument("--runs", type=int, default=3,
                        help="starts per case; each case reports the median "
                             "(default: %(default)s)")
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
    args = parser.parse_args()
    if args.runs < 1:
        parser.error(f"--runs must be at least 1; got {args.runs}")
    return args


def count_table(name: str):
    """The tuned table --count counts hits against: None for 'every' (every key a hit), an
    empty table for 'none', else the table in file `name`."""
    from shardline.kernels import _tuned
    if name == "every":
        return None
    if name == "none":
        return _tuned.TunedTable("none")
    if name == "packaged":
        sys.exit("--count --table packaged: the CPU has no packaged table; use 'every', "
                 "'none' or a table file")
    return _tuned.read_table(name)


def main() -> None:
    args = parse_args()
    if args.child:
        child(args)
        return
    if args.count:
        # Launches are counted, never run: under the interpreter triton would run them.
        os.environ.pop("TRITON_INTERPRET", None)
        table_name = args.table or "every"
        table = count_table(table_name)
        reports = []
        for model in args.models:
            report = count_compiles(model, args.dtype, limits_from(args), table, args.sms)
            report["table"] = "every key in it" if table_name == "every" else table_name
            print_counts(report)
            reports.append(report)
        result = {"command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
                  "sms": args.sms, "triton": __import__("triton").__version__,
                  "models": reports}
        out = args.out or RESULTS / "startup_count.json"
    else:
        args.table = args.table or "packaged"
        if args.table == "every":
            sys.exit("--table every is for --count only: a start needs a real table "
                     "('packaged', 'none' or a file)")
        if args.device == "cuda" and not torch.cuda.is_available():
            sys.exit("bench/startup.py times engine starts on a CUDA GPU and none is "
                     "visible; `--count` reports the compiles of a start on the CPU, "
                     "`--device cpu` smoke-runs the timing code.")
        out = args.out or RESULTS / "startup.json"
        time_starts(args, out)
        return
    write_result(result, out)


def write_result(result: dict, out: Path) -> None:
    write_json(out, result, indent=1)
    print(f"wrote {out}", flush=True)


if __name__ == "__main__":
    main()

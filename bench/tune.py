"""Tune the Triton kernels for this GPU and write the table the engine ships.

For each model given, the launches of an engine start are run (bench/start_shapes.py:
the prefill warm-up of every token bucket, then a decode forward per graph batch size)
on random weights, each new kernel key recorded with its arguments. Then, a chunk of keys
at a time, every candidate config is compiled (in parallel on the CPU cores) and timed,
and the fastest written to the tuned table of this GPU (shardline.kernels._tuned), the
file rewritten after each chunk so that a run cut short keeps what it measured. Last, each
linear shape is timed together with the op its GEMM feeds (SiLU * up, the residual add and
RMSNorm, the rotary + KV-cache write) in its Triton form (the fused kernels, now with
their tuned configs) and in its torch.matmul (cuBLAS) form, every M the start met in the
bucket summed, and the faster recorded: the engine then takes that form there.

    python bench/tune.py                                  # the 1B model and small-llama
    python bench/tune.py --models small-llama --time-limit 120 --out-dir /tmp/tables

The table goes to kernels/tuned/<gpu>.json (or --out-dir/<gpu>.json); keys already in
that file and not tuned again are kept. Decode attention is timed on the warm-up's own
KV layout (every sequence reads block 0), as the engine's autotuning was.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable
from unittest import mock

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")   # silences triton 3.9's warning

import torch

from _configs import describe
from start_shapes import (E2E_1B, add_limit_args, build_model, config_dtype, import_kernels,
                          limits_from, model_config, walk_start)

MODELS = (E2E_1B, "small-llama")


@dataclass
class Launch:
    """A kernel key's first launch, its arguments kept for timing."""

    kernel: Any
    key: str
    grid: Any
    args: tuple
    kwargs: dict


class Deadline:
    def __init__(self, seconds: float | None) -> None:
        self.end = math.inf if seconds is None else time.monotonic() + seconds

    def passed(self) -> bool:
        return time.monotonic() > self.end


def _keep(value: Any, persistent: set[int]) -> Any:
    """A tensor argument as it is now: weights and caches by reference, the rest copied
    (the walk reuses and rewrites its buffers after the launch)."""
    if isinstance(value, torch.Tensor) and value.untyped_storage().data_ptr() not in persistent:
        return value.clone()
    return value


def record_launches(model: torch.nn.Module, config: dict, limits, device: torch.device,
                    launches: dict[tuple[str, str], Launch]) -> None:
    """Run a start's launches with default configs, keeping each new key's first launch."""
    from shardline.kernels._config import TunedKernel
    original = TunedKernel._launch
    persistent = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def keep_first(kernel, args, grid, warmup, kwargs, chosen):
        key = kernel.table_key(args, kwargs)
        if (kernel.name, key) not in launches:
            kept = [_keep(a, persistent | caches()) for a in args]
            launches[kernel.name, key] = Launch(kernel, key, grid, tuple(kept), dict(kwargs))
        return original(kernel, args, grid, warmup, kwargs, chosen)

    def caches() -> set[int]:
        return {t.untyped_storage().data_ptr() for a in model.attention_layers()
                for t in (a.k_cache, a.v_cache)}

    with mock.patch.object(TunedKernel, "_launch", keep_first):
        walk_start(model, config, limits, device)


def compile_candidates(launches: list[Launch], device: torch.device) -> float:
    """Compile every candidate config of every launch, on all CPU cores at once."""
    from shardline.kernels._tuned import compile_ahead
    started = time.perf_counter()
    with compile_ahead(device):
        for launch in launches:
            for config in launch.kernel.candidates(launch.args, launch.kwargs):
                launch.kernel.fn.warmup(*launch.args, grid=launch.grid, **launch.kwargs,
                                        **config.all_kwargs())
    return time.perf_counter() - started


def median_ms(fn: Callable[[], object], warmup_ms: int, rep_ms: int) -> float:
    import triton.testing
    return triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")


def time_candidates(launch: Launch, warmup_ms: int, rep_ms: int) -> dict:
    """Median ms of each candidate config (inf where it cannot launch here)."""
    from triton.compiler.errors import CompileTimeAssertionFailure
    from triton.runtime.errors import OutOfResources, PTXASError
    kernel = launch.kernel
    timings = {}
    for config in kernel.candidates(launch.args, launch.kwargs):
        def run(config=config) -> None:
            kernel._launch(launch.args, launch.grid, False, launch.kwargs, config)
        try:
            timings[config] = median_ms(run, warmup_ms, rep_ms)
        except (OutOfResources, PTXASError, CompileTimeAssertionFailure):
            timings[config] = math.inf
    return timings


def tune_kernels(launches: list[Launch], table, path: Path, device: torch.device,
                 deadline: Deadline, warmup_ms: int, rep_ms: int) -> None:
    """Compile a chunk of keys' candidates at once, time them, keep the winners and write
    the table; chunk after chunk until every key is done or the time limit passes."""
    from shardline.kernels._tuned import write_table
    chunk = 2 * len(os.sched_getaffinity(0))
    for start in range(0, len(launches), chunk):
        if deadline.passed():
            print(f"time limit reached: {len(launches) - start} keys left untuned",
                  flush=True)
            return
        batch = launches[start:start + chunk]
        print(f"compiled every candidate of keys {start + 1}-{start + len(batch)} in "
              f"{compile_candidates(batch, device):.1f} s", flush=True)
        for i, launch in enumerate(batch, start + 1):
            started = time.perf_counter()
            timings = time_candidates(launch, warmup_ms, rep_ms)
            best = min(timings, key=timings.get)
            head = f"[{i}/{len(launches)}] {launch.kernel.name} {launch.key}:"
            if math.isinf(timings[best]):
                print(f"{head} no config launches here; left out", flush=True)
                continue
            table.kernels.setdefault(launch.kernel.name, {})[launch.key] = best
            first = next(iter(timings))
            print(f"{head} {len(timings)} configs, best {describe(best)} "
                  f"{timings[best] * 1e3:.1f} us (first listed {timings[first] * 1e3:.1f} "
                  f"us), {time.perf_counter() - started:.1f} s", flush=True)
        write_table(table, path)


def linear_args(m: int, rows: int, k: int, dtype: torch.dtype, op: str,
                heads: tuple[int, int, int] | None, device: torch.device) -> tuple:
    """Random arguments of the linear `op` (one of _tuned.LINEAR_OPS) at this shape, for
    both of its forms (dispatch.linear_forms)."""
    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, dtype=dtype, device=device) * scale

    x, weight = randn(m, k), randn(rows, k, scale=k ** -0.5)
    if op in ("linear", "silu_mul"):
        return x, weight
    if op == "rms_norm":
        return x, weight, None, randn(m, rows), randn(rows), 1e-6
    num_heads, kv_heads, head_size = heads
    block_size = 16
    blocks = -(-m // block_size)
    angles = torch.rand(m, head_size // 2, device=device) * math.tau
    cos_sin = torch.cat((angles.cos(), angles.sin()), dim=-1).to(dtype)
    k_cache, v_cache = (randn(blocks, block_size, kv_heads, head_size) for _ in range(2))
    slots = torch.randperm(blocks * block_size, device=device)[:m]
    return (x, weight, None, torch.arange(m, device=device), cos_sin, True, k_cache,
            v_cache, slots, num_heads)


def tune_linear(table, shapes: list[tuple], device: torch.device, deadline: Deadline,
                warmup_ms: int, rep_ms: int) -> None:
    """Per linear key, the op its GEMM feeds in its Triton form (the fused kernels) against
    its torch.matmul form, over every M met in the key."""
    from shardline.kernels import _tuned, dispatch
    groups: dict[str, list[tuple]] = {}
    for shape in shapes:
        groups.setdefault(_tuned.linear_key(*shape[:5]), []).append(shape)
    for i, (key, shapes) in enumerate(sorted(groups.items()), 1):
        if deadline.passed():
            print(f"time limit reached: {len(groups) - i + 1} linear keys left untimed")
            return
        triton_ms = torch_ms = 0.0
        for shape in sorted(set(shapes), key=lambda s: s[0]):
            ours, theirs = dispatch.linear_forms(shape[4])
            args = linear_args(*shape, device)
            triton_ms += median_ms(lambda: ours(*args), warmup_ms, rep_ms)
            torch_ms += median_ms(lambda: theirs(*args), warmup_ms, rep_ms)
        backend = "torch" if torch_ms < triton_ms else "triton"
        table.linear[key] = {"backend": backend, "triton_ms": round(triton_ms, 5),
                             "torch_ms": round(torch_ms, 5)}
        print(f"[{i}/{len(groups)}] linear {key}: triton {triton_ms * 1e3:.1f} us, "
              f"torch.matmul {torch_ms * 1e3:.1f} us -> {backend}", flush=True)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS),
                        help=f"presets, model directories (config.json) or {E2E_1B}")
    parser.add_argument("--dtype", default="auto",
                        help="as LLM(dtype=...): 'auto' is the checkpoint's dtype")
    add_limit_args(parser)
    parser.add_argument("--out-dir", type=Path, default=None,
                        help="where <gpu>.json goes (default: the package's kernels/tuned)")
    parser.add_argument("--time-limit", type=float, default=None,
                        help="seconds; keys not timed by then stay out of the table")
    parser.add_argument("--warmup-ms", type=int, default=5)
    parser.add_argument("--rep-ms", type=int, default=25)
    return parser.parse_args()


def tune(args: argparse.Namespace, device: torch.device, gpu: str) -> Path:
    """Record, compile, time and write the table of GPU `gpu`; returns its path."""
    import triton
    from shardline.kernels import _tuned, dispatch
    os.environ["SHARDLINE_TUNED_TABLE"] = "none"   # time every key afresh
    dispatch.reset_triton_choice()
    _tuned.reset()
    _tuned.set_autotuning(False)
    import_kernels()
    deadline = Deadline(args.time_limit)
    path = (args.out_dir or _tuned.TABLE_DIR) / f"{_tuned.device_slug(gpu)}.json"
    table = _tuned.read_table(path) if path.is_file() else _tuned.TunedTable(gpu)
    if table.device != gpu:
        sys.exit(f"{path} holds configs of a {table.device}, not of this {gpu}")
    table.tuned_with = {"triton": triton.__version__, "torch": torch.__version__}
    launches: dict[tuple[str, str], Launch] = {}
    # Forced: without a table every linear would take its torch.matmul form, and its
    # Triton kernels' keys would go unrecorded.
    with mock.patch.dict(os.environ, {"SHARDLINE_FORCE_TRITON": "1"}):
        dispatch.reset_triton_choice()
        for model_name in args.models:
            started = time.perf_counter()
            config = model_config(model_name, torch.bfloat16)
            model = build_model(config, config_dtype(config, args.dtype), device,
                                random_weights=True)
            before = len(launches)
            record_launches(model, config, limits_from(args), device, launches)
            print(f"{model_name}: {len(launches) - before} new kernel keys in "
                  f"{time.perf_counter() - started:.1f} s", flush=True)
    dispatch.reset_triton_choice()
    tune_kernels(list(launches.values()), table, path, device, deadline, args.warmup_ms,
                 args.rep_ms)
    _tuned.write_table(table, path)
    os.environ["SHARDLINE_TUNED_TABLE"] = str(path)   # linears time with the tuned configs
    linear_shapes = _tuned.linear_shapes()
    _tuned.reset()
    _tuned.set_autotuning(False)
    tune_linear(table, linear_shapes, device, deadline, args.warmup_ms, args.rep_ms)
    _tuned.write_table(table, path)
    print(f"wrote {path}: {sum(len(v) for v in table.kernels.values())} kernel keys, "
          f"{len(table.linear)} linear keys")
    return path


def main() -> None:
    args = parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/tune.py times kernels on a CUDA GPU and none is visible; "
                 "`python bench/startup.py --count` shows on the CPU what a table saves.")
    tune(args, torch.device("cuda"), torch.cuda.get_device_name())


if __name__ == "__main__":
    main()

"""Where a decode step's GPU time goes: the decode forward profiled kernel by kernel.

bench/e2e_decode.py's engine and model (Llama-3.2-1B shape, random bf16 weights) serve
--batches sequences of --context cached tokens; their decode forward through the logits
(e2e_decode's forward-alone diagnostic) runs --steps times under torch.profiler. Per op
of shardline.kernels and per kernel: calls, us and share of a step; where an op's bytes
are known (a GEMM's weight, rows x K x itemsize; decode attention's context K/V), the
GB/s it reaches and the us it loses against the copy bandwidth of the same run. Beside
them: step wall time against the sum of its kernels (the gap is launch and host time),
eager and CUDA-graph step times without the profiler, the roofline's floor.

The profile is of the EAGER forward (the same kernels, launched op by op): the profiler
does not attribute a CUDA graph replay's kernels on every torch. Its wall time is eager
decode's plus the profiler's host cost, so its gaps overstate the graph replay's. Each op
runs, for the profile only, in a record_function named after it and its weight's shape.

    python bench/decode_profile.py                      # CUDA GPU (H100 / H200), < 1 min
    python bench/decode_profile.py --tiny --device cpu  # smoke run: CPU ops stand in for
                                                        # kernels; its numbers mean nothing

The JSON (bench/results/decode_profile.json; a temporary folder for --tiny) is written
after each batch size, so that a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import dataclasses
import inspect
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from _files import write_json
from _models import LLAMA_3_2_1B, TINY, ModelShape, checkpoint_dir
from _timing import Timer, copy_bandwidth
from e2e_decode import (BLOCK_SIZE, RESULTS_DIR, Plan, add_model_args, decode_forward,
                        graph_step_ms, refuse_unrunnable, request_id, sync, timed_decode,
                        weight_bytes)
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, record_function

OP_PREFIX = "op:"
STEP_LABEL = "decode_profile:step"
PREFILL_CHUNK = 2048   # the engine's max_num_batched_tokens (its default)
SHOWN_PER_OP, SHOWN_KERNELS = 3, 12   # kernel rows printed (the JSON has them all)
EAGER_REPS = 20   # eager forwards timed without the profiler
NO_OP = "(no shardline.kernels op)"   # the op of a kernel launched outside them (CUDA)


@contextlib.contextmanager
def op_labels(kv_tokens: int) -> Iterator[dict[str, int | None]]:
    """While entered, every op of shardline.kernels runs inside a record_function named
    `op:<label>` (see `describe`); yields the bytes one call of each label reads, None
    where not known. The layers call the ops as `kernels.<name>(...)`, so replacing the
    package's attributes reaches every call."""
    from shardline import kernels
    op_bytes: dict[str, int | None] = {}
    saved = {name: getattr(kernels, name) for name in kernels.__all__}
    try:
        for name, op in saved.items():
            setattr(kernels, name, labelled(name, op, kv_tokens, op_bytes))
        yield op_bytes
    finally:
        for name, op in saved.items():
            setattr(kernels, name, op)


def labelled(name: str, op: Callable[..., Any], kv_tokens: int,
             op_bytes: dict[str, int | None]) -> Callable[..., Any]:
    params = list(inspect.signature(op).parameters)
    where = [(p, params.index(p) if p in params else None) for p in ("weight", "k_cache")]

    def call(*args: Any, **kwargs: Any) -> Any:
        found = [None if i is None else args[i] if i < len(args) else kwargs.get(p)
                 for p, i in where]
        label, nbytes = describe(name, *found, kv_tokens)
        op_bytes.setdefault(label, nbytes)
        with record_function(OP_PREFIX + label):
            return op(*args, **kwargs)
    return call


def describe(name: str, weight: Any, k_cache: Any, kv_tokens: int) -> tuple[str, int | None]:
    """(label, bytes one call reads) of a call of op `name`: a GEMM is labelled with its
    weight's shape and reads that weight; decode attention reads the K/V of `kv_tokens`
    cached tokens; other ops' bytes are not counted (None)."""
    if isinstance(weight, torch.Tensor) and weight.dim() == 2:
        rows, k = weight.shape
        return f"{name}[{rows}x{k}]", weight.numel() * weight.element_size()
    if name == "paged_decode_attention" and isinstance(k_cache, torch.Tensor):
        heads, dim = k_cache.shape[-2:]   # [blocks, block_size, kv heads, head dim]
        return name, kv_tokens * 2 * heads * dim * k_cache.element_size()
    return name, None


def duration_us(event: Any) -> float:
    return event.time_range.end - event.time_range.start


def is_label(name: str) -> bool:
    return name.startswith(OP_PREFIX) or name == STEP_LABEL


def op_of(event: Any) -> tuple[str, Any] | None:
    """(op label, the event that stands for one call of it) of a profiled event: its
    innermost `op:` range, else the outermost event below the step (an op the model
    calls directly, as the embedding's); None outside every step."""
    below_step = None
    node = event
    while node is not None:
        if node.name.startswith(OP_PREFIX):
            return node.name[len(OP_PREFIX):], node
        if node.name == STEP_LABEL:
            return (below_step.name, below_step) if below_step is not None else None
        below_step, node = node, node.cpu_parent
    return None


Piece = tuple[str, Any, str, float]   # (op label, its call, kernel name, us)


def kernel_pieces(events: list, on_cuda: bool) -> list[Piece]:
    """Every kernel of the steps: on CUDA a device event (see `device_pieces`); on the CPU
    an op's self time, in the op of `op_of`."""
    if on_cuda:
        return device_pieces(events)
    pieces = []
    for event in events:
        owner = op_of(event) if event.device_type == DeviceType.CPU else None
        if owner is not None and not event.is_async and event.name != STEP_LABEL:
            name = "(own time)" if is_label(event.name) else event.name   # Python, C++
            pieces.append((*owner, name, event.self_cpu_time_total))
    return pieces


def device_pieces(events: list) -> list[Piece]:
    """Each device kernel in the innermost op whose device-side range holds it (the
    profiler's gpu_user_annotation of the op's record_function: a kernel launched in a
    record_function is linked to it only so, and the Triton launches happen outside any
    aten op); a kernel in none (the embedding's) is a call of NO_OP."""
    spans = sorted((e for e in events if e.device_type == DeviceType.CUDA
                    and e.name.startswith(OP_PREFIX)),
                   key=lambda e: (e.time_range.start, -e.time_range.end))
    starts = [e.time_range.start for e in spans]
    pieces: list[Piece] = []
    for k in events:
        if k.device_type != DeviceType.CUDA or k.is_user_annotation or is_label(k.name):
            continue
        at, end = k.time_range.start, k.time_range.end
        i = bisect.bisect_right(starts, at) - 1
        while i >= 0 and spans[i].time_range.end < end:
            i -= 1
        owner = ((spans[i].name[len(OP_PREFIX):], spans[i]) if i >= 0 else (NO_OP, k))
        pieces.append((*owner, k.name, duration_us(k)))
    return pieces


def per_step_rows(pieces: list[Piece], steps: int, step_us: float,
                  op_bytes: dict[str, int | None], bandwidth: float
                  ) -> tuple[list[dict], list[dict]]:
    """Rows per op (with its kernels) and per kernel name, each per step, biggest first;
    shares are of the step's wall time and of the sum of its kernels."""
    kernel_us = max(sum(p[3] for p in pieces) / steps, 1e-9)
    calls: dict[str, set[int]] = defaultdict(set)
    op_us: dict[str, float] = defaultdict(float)
    kernels: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    by_name: dict[str, list[float]] = defaultdict(list)
    for label, call, name, us in pieces:
        calls[label].add(id(call))
        op_us[label] += us
        kernels[label][name].append(us)
        by_name[name].append(us)

    def row(name: str, times: list[float]) -> dict:
        us = sum(times) / steps
        return {"name": name, "calls_per_step": len(times) / steps, "us_per_step": us,
                "share_of_step": us / step_us, "share_of_kernels": us / kernel_us}

    def biggest_first(groups: dict[str, list[float]]) -> list[dict]:
        return sorted((row(n, t) for n, t in groups.items()), key=lambda r: -r["us_per_step"])

    ops = []
    for label, total in op_us.items():
        us, nbytes = total / steps, op_bytes.get(label)
        step_bytes = None if nbytes is None else nbytes * len(calls[label]) / steps
        floor_us = 0.0 if step_bytes is None else step_bytes / bandwidth * 1e6
        ops.append({
            "op": label, "calls_per_step": len(calls[label]) / steps, "us_per_step": us,
            "share_of_step": us / step_us, "share_of_kernels": us / kernel_us,
            "bytes_per_call": nbytes, "bytes_per_step": step_bytes,
            "GBps": None if step_bytes is None else step_bytes / us / 1e3,
            "fraction_of_copy_bw": None if step_bytes is None else floor_us / us,
            "floor_us_per_step": floor_us, "excess_us_per_step": us - floor_us,
            "kernels": biggest_first(kernels[label]),
        })
    ops.sort(key=lambda r: -r["us_per_step"])
    return ops, biggest_first(by_name)


def profile_batch(llm: Any, batch: int, args: argparse.Namespace, shape: ModelShape,
                  dtype: torch.dtype, device: torch.device, weights: int,
                  bandwidth: float) -> dict:
    """Fill the context of `batch` sequences through the engine, then time and profile
    their decode forward."""
    runner = llm.engine.executor.worker.model_runner
    plan = Plan((batch,), prompt_len=args.context, timed_tokens=1, warmup_tokens=2, runs=1)
    timed_decode(llm, batch, plan, shape.vocab, 0, shape.kv_bytes_per_token(dtype), device)
    req_ids = [request_id(batch, 0, i) for i in range(batch)]
    forward, kv_tokens = decode_forward(runner, req_ids)
    on_cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
    with torch.inference_mode():
        eager_ms = Timer(device, warmup=3, reps=EAGER_REPS)(lambda i: forward())
        graph_ms = graph_step_ms(runner, req_ids) if on_cuda else None
        with op_labels(kv_tokens) as op_bytes:
            forward()
            sync(device)
            with profile(activities=activities) as prof:
                start = time.perf_counter()
                for _ in range(args.steps):
                    with record_function(STEP_LABEL):
                        forward()
                sync(device)
                wall_s = time.perf_counter() - start
    for req_id in list(llm.engine.outputs.requests):
        llm.abort_request(req_id)
    events = list(prof.events())
    pieces = kernel_pieces(events, on_cuda)
    if on_cuda and not any(p[0] != NO_OP for p in pieces):
        print("warning: the profiler gave no device-side op ranges (gpu_user_annotation): "
              "no kernel is grouped by op", file=sys.stderr)
    step_us = wall_s * 1e6 / args.steps
    kernel_step_us = sum(p[3] for p in pieces) / args.steps
    ops, kernels = per_step_rows(pieces, args.steps, step_us, op_bytes, bandwidth)
    host = [duration_us(e) for e in events if e.name == STEP_LABEL
            and e.device_type == DeviceType.CPU]
    kv_bytes = kv_tokens * shape.kv_bytes_per_token(dtype)
    return {
        "batch": batch, "context": args.context, "steps": args.steps, "kv_tokens": kv_tokens,
        "bytes_per_step": weights + kv_bytes, "kv_bytes_per_step": kv_bytes,
        "floor_ms": (weights + kv_bytes) / bandwidth * 1e3,
        "eager_step_ms": eager_ms, "graph_step_ms": graph_ms,
        "profiled_step_ms": step_us / 1e3,
        "host_forward_ms": statistics.mean(host) / 1e3 if host else None,
        "kernel_ms_per_step": kernel_step_us / 1e3,
        "kernels_per_step": len(pieces) / args.steps,
        "gap_ms_per_step": (step_us - kernel_step_us) / 1e3,
        "kernel_fraction_of_step": kernel_step_us / step_us,
        "ops": ops, "kernels": kernels,
    }


def print_batch(r: dict, bandwidth: float) -> None:
    """The batch's step times, its ops (each with its biggest kernels) and kernels."""
    graph = "n/a" if r["graph_step_ms"] is None else f"{r['graph_step_ms']:.3f} ms"
    print(f"\nbatch {r['batch']}, context {r['context']} tokens/seq, {r['steps']} eager steps "
          f"profiled: step wall {r['profiled_step_ms']:.3f} ms, kernels "
          f"{r['kernel_ms_per_step']:.3f} ms ({r['kernel_fraction_of_step']:.0%}, "
          f"{r['kernels_per_step']:.0f} per step), gaps {r['gap_ms_per_step']:.3f} ms")
    print(f"  unprofiled: eager {r['eager_step_ms']:.3f} ms, CUDA graph {graph}; floor "
          f"{r['floor_ms']:.3f} ms ({r['bytes_per_step'] / 1e6:.1f} MB at "
          f"{bandwidth / 1e9:.0f} GB/s)")
    print(f"  {'op / its biggest kernels':<46} {'calls':>6} {'us/step':>9} {'of step':>7} "
          f"{'of kern':>7} {'MB/call':>8} {'GB/s':>7} {'of BW':>6} {'lost us':>8}")
    for op in r["ops"]:
        known = op["bytes_per_call"] is not None
        extra = (f"{op['bytes_per_call'] / 1e6:8.2f} {op['GBps']:7.0f} "
                 f"{op['fraction_of_copy_bw']:6.0%}" if known else f"{'':8} {'':7} {'':6}")
        print(f"  {op['op'][:46]:<46} {op['calls_per_step']:6.1f} {op['us_per_step']:9.1f} "
              f"{op['share_of_step']:7.1%} {op['share_of_kernels']:7.1%} {extra} "
              f"{op['excess_us_per_step']:8.1f}")
        print_kernels(op["kernels"], SHOWN_PER_OP, "    ")
    print(f"  {'kernels by name':<46}")
    print_kernels(r["kernels"], SHOWN_KERNELS, "    ")


def print_kernels(rows: list[dict], shown: int, indent: str) -> None:
    for k in rows[:shown]:
        print(f"{indent}{k['name'][:44]:<44} {k['calls_per_step']:6.1f} "
              f"{k['us_per_step']:9.1f} {k['share_of_step']:7.1%} {k['share_of_kernels']:7.1%}")
    if len(rows) > shown:
        rest = sum(k["us_per_step"] for k in rows[shown:])
        print(f"{indent}(+{len(rows) - shown} more: {rest:.1f} us/step)")


def print_summary(results: list[dict]) -> None:
    """One line per batch: where the step's time goes, and the ops that lose most."""
    print(f"\n{'batch':>5} {'floor ms':>9} {'graph ms':>9} {'kernels ms':>10} {'eager ms':>9}"
          "  ops losing most against the copy bandwidth (us/step)")
    for r in results:
        graph = "n/a" if r["graph_step_ms"] is None else f"{r['graph_step_ms']:.3f}"
        worst = sorted(r["ops"], key=lambda o: -o["excess_us_per_step"])[:3]
        print(f"{r['batch']:5d} {r['floor_ms']:9.3f} {graph:>9} {r['kernel_ms_per_step']:10.3f} "
              f"{r['eager_step_ms']:9.3f}  "
              + ", ".join(f"{o['op']} {o['excess_us_per_step']:.0f}" for o in worst))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_args(parser, "tiny model, short context: a smoke run of every code path")
    parser.add_argument("--batches", type=int, nargs="+",
                        help="batch sizes (default 1 16 64; 1 2 4 with --tiny)")
    parser.add_argument("--context", type=int, help="tokens cached per sequence (512; 16)")
    parser.add_argument("--steps", type=int, help="decode forwards profiled per batch (20; 3)")
    parser.add_argument("--out-dir", type=Path, help="where decode_profile.json goes "
                        "(default bench/results; a temporary folder for --tiny)")
    args = parser.parse_args()
    defaults = {"batches": ([1, 16, 64], [1, 2, 4]), "context": (512, 16), "steps": (20, 3)}
    for name, (full, tiny) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, tiny if args.tiny else full)
    for name, value in (("batches", min(args.batches)), ("context", args.context),
                        ("steps", args.steps)):
        if value < 1:
            parser.error(f"--{name}={value} is invalid: must be >= 1")
    return args


def main() -> None:
    args = parse_args()
    refuse_unrunnable(args, "decode_profile.py")
    began = time.perf_counter()
    os.environ["SHARDLINE_DEVICE"] = args.device   # the worker's device
    from shardline.config import resolve_dtype
    from shardline.engine.llm import LLM

    device = torch.device(args.device, 0) if args.device == "cuda" else torch.device("cpu")
    dtype = resolve_dtype(args.dtype)
    shape = TINY if args.tiny else LLAMA_3_2_1B
    max_batch = max(args.batches)
    max_len = args.context + -(-max_batch * args.context // PREFILL_CHUNK) + 8
    llm = LLM(checkpoint_dir(shape, dtype, device), dtype=args.dtype, max_model_len=max_len,
              max_num_seqs=max_batch, max_num_batched_tokens=max(PREFILL_CHUNK, max_batch),
              block_size=BLOCK_SIZE, num_kv_blocks=max_batch * -(-max_len // BLOCK_SIZE) + 8,
              enforce_eager=True)   # no decode graphs to capture: the forward is run here
    try:
        profile_all(llm, args, shape, dtype, device, began)
    finally:
        llm.shutdown()


def profile_all(llm: Any, args: argparse.Namespace, shape: ModelShape, dtype: torch.dtype,
                device: torch.device, began: float) -> None:
    """Every batch size, the JSON written after each."""
    import triton
    weights = weight_bytes(llm.engine.executor.worker.model_runner.model)
    bandwidth = copy_bandwidth(Timer(device, warmup=3, reps=20), 1 << (24 if args.tiny else 30))
    report = {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
        "tiny": args.tiny, "dtype": args.dtype, "torch": torch.__version__,
        "triton": triton.__version__,
        "model": "tiny Llama" if args.tiny else "Llama-3.2-1B shape, random weights",
        "profiled": "eager decode forward through the logits (kernels launched op by op)",
        "kernels_are": "device kernels" if device.type == "cuda" else "CPU ops (self time)",
        "shape": dataclasses.asdict(shape), "context": args.context, "steps": args.steps,
        "batches": args.batches, "weight_bytes": weights,
        "copy_bandwidth_GBps": bandwidth / 1e9, "results": [],
    }
    args.out_dir = args.out_dir or (Path(tempfile.mkdtemp(prefix="shardline-profile-"))
                                    if args.tiny else RESULTS_DIR)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    out = args.out_dir / "decode_profile.json"
    print(f"device: {report['device']}  dtype: {args.dtype}  weights: {weights / 1e9:.3f} GB  "
          f"copy BW: {bandwidth / 1e9:.1f} GB/s  kernels are {report['kernels_are']}"
          + ("  (TINY SMOKE RUN: numbers mean nothing)" if args.tiny else ""))
    for batch in args.batches:
        result = profile_batch(llm, batch, args, shape, dtype, device, weights, bandwidth)
        report["results"].append(result)
        write_json(out, report)
        print_batch(result, bandwidth)
        print(f"batch {batch}: done at {time.perf_counter() - began:.1f} s", file=sys.stderr,
              flush=True)
    print_summary(report["results"])
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

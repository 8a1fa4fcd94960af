"""End-to-end decode throughput of the engine on one GPU, against the memory roofline.

The whole engine (LLM, scheduler, UniProcExecutor, worker, Triton kernels) serves a
Llama-3.2-1B-shaped model with random bf16 weights at batch 1, 16 and 64. Decode is
memory bound, so each step's floor is the bytes it must read (every weight once, plus the
K/V of every cached token) over the device's copy bandwidth, measured in the same run.
Steady-state decode tokens/s is reported against that roofline; issue 10's targets are
at least 70% of it at batch 1 and 60% at batch 64 (the largest batch stands for 64 in
smaller plans). On CUDA the engine replays its decode steps from CUDA graphs
(its default); --enforce-eager measures it launching op by op instead. As a diagnostic,
the model's decode forward through the logits is also timed alone as one CUDA graph,
which shows what the kernels reach without any of the host's per-step work.

    python bench/e2e_decode.py                     # CUDA GPU (H100 / H200)
    python bench/e2e_decode.py --tiny --device cpu  # smoke run of the same code on CPU:
                                                    # tiny model, torch references; its
                                                    # numbers mean nothing

Adding SHARDLINE_FORCE_TRITON=1 TRITON_INTERPRET=1 and --dtype float32 to the smoke run
sends it through the Triton interpreter instead (slow). Results go to
bench/results/e2e_decode.json and .png (a temporary folder for --tiny).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from _files import write_json
from _models import LLAMA_3_2_1B, TINY, ModelShape, checkpoint_dir
from _timing import Timer, copy_bandwidth

RESULTS_DIR = Path(__file__).resolve().parent / "results"
TARGET_FRACTIONS = {"smallest": 0.7, "largest": 0.6}   # of the roofline (issue 10)
BLOCK_SIZE = 16
GRAPH_REPS = 50


@dataclass(frozen=True)
class Plan:
    """What one bench run decodes: batch sizes, prompt length, tokens timed per run."""

    batches: tuple[int, ...]
    prompt_len: int
    timed_tokens: int
    warmup_tokens: int
    runs: int


FULL_PLAN = Plan(batches=(1, 16, 64), prompt_len=128, timed_tokens=128, warmup_tokens=8,
                 runs=5)
TINY_PLAN = Plan(batches=(1, 2, 4), prompt_len=16, timed_tokens=8, warmup_tokens=3, runs=2)


@dataclass
class BatchResult:
    """Decode at one batch size: the engine's runs, the roofline, the CUDA-graph forward."""

    batch: int
    tokens_per_s_runs: list[float]
    tokens_per_s: float
    step_ms: float
    bytes_per_step: float
    roofline_tokens_per_s: float
    fraction_of_roofline: float
    graph_step_ms: float | None
    graph_fraction_of_roofline: float | None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of every parameter, the tied embedding once: what one decode step reads."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def request_id(batch: int, run: int, index: int) -> str:
    return f"b{batch}-r{run}-{index}"


def timed_decode(llm, batch: int, plan: Plan, vocab: int, run: int, kv_bytes_per_token: int,
                 device: torch.device) -> tuple[float, float]:
    """Start `batch` requests, decode until each has warmup_tokens, then time timed_tokens
    decode-only steps. Returns (tokens/s, mean bytes read per timed step: KV part only).
    The requests are left running; the caller aborts them."""
    from shardline.sampling_params import SamplingParams
    spread = -(-batch * plan.prompt_len // llm.engine.config.scheduler.max_num_batched_tokens)
    params = SamplingParams(temperature=0.0, ignore_eos=True,
                            max_tokens=plan.warmup_tokens + plan.timed_tokens + spread + 1)
    gen = torch.Generator().manual_seed(run)
    generated: dict[str, int] = {}
    for i in range(batch):
        prompt = torch.randint(vocab, (plan.prompt_len,), generator=gen).tolist()
        llm.add_request(request_id(batch, run, i), prompt, params)
        generated[request_id(batch, run, i)] = 0
    while min(generated.values()) < plan.warmup_tokens:
        for out in llm.step():
            generated[out.request_id] = len(out.outputs[0].token_ids)
    kv_bytes = 0
    sync(device)
    start = time.perf_counter()
    for _ in range(plan.timed_tokens):
        kv_bytes += sum(plan.prompt_len + n for n in generated.values()) * kv_bytes_per_token
        outputs = llm.step()
        if len(outputs) != batch:
            raise RuntimeError(f"a timed step produced {len(outputs)} tokens, expected "
                               f"{batch}: the batch is not in steady-state decode")
        for out in outputs:
            generated[out.request_id] = len(out.outputs[0].token_ids)
    sync(device)
    seconds = time.perf_counter() - start
    return batch * plan.timed_tokens / seconds, kv_bytes / plan.timed_tokens


def decode_forward(runner, req_ids: list[str]) -> tuple[Callable[[], torch.Tensor], int]:
    """The model's decode forward (through the logits) for the last step of the running
    requests `req_ids`, and the K/V tokens it reads (each sequence's whole length). The
    worker's state still describes that step, and rewriting its K/V stores the same values.
    """
    from shardline.worker.input_batch import build_step_inputs
    # Each request's last known token, decoded again: under async scheduling the worker's
    # last step may have gone ahead of the tokens it was sent.
    states = [dataclasses.replace(runner.requests[r],
                                  num_computed_tokens=runner.requests[r].num_tokens - 1)
              for r in req_ids]
    inputs = build_step_inputs(states, [1] * len(states), runner.block_size, runner.device)
    model = runner.model

    def forward() -> torch.Tensor:
        return model.compute_logits(model(inputs.input_ids, inputs.positions, inputs.meta))
    return forward, sum(s.num_tokens for s in states)


def graph_step_ms(runner, req_ids: list[str]) -> float:
    """Median device time of decode_forward replayed from a CUDA graph."""
    forward, _ = decode_forward(runner, req_ids)
    with torch.inference_mode():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                forward()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            forward()
        return Timer(runner.device, warmup=3, reps=GRAPH_REPS)(lambda i: graph.replay())


def bench_batch(llm, batch: int, plan: Plan, shape: ModelShape, dtype: torch.dtype,
                device: torch.device, weights: int, bandwidth: float) -> BatchResult:
    """One untimed run first (Triton compiles, and autotunes if asked, every shape the timed runs
    meet), then `plan.runs` timed runs; the CUDA graph replays the last run's batch."""
    kv_per_token = shape.kv_bytes_per_token(dtype)
    runner = llm.engine.executor.worker.model_runner
    rates, kv_bytes, graph_ms = [], 0.0, None
    for run in range(plan.runs + 1):
        rate, kv_bytes = timed_decode(llm, batch, plan, shape.vocab, run, kv_per_token, device)
        if run > 0:
            rates.append(rate)
        if run == plan.runs and device.type == "cuda":
            req_ids = [request_id(batch, run, i) for i in range(batch)]
            graph_ms = graph_step_ms(runner, req_ids)
        for req_id in list(llm.engine.outputs.requests):
            llm.abort_request(req_id)
    tokens_per_s = statistics.median(rates)
    step_bytes = weights + kv_bytes
    roofline = batch * bandwidth / step_bytes
    graph_fraction = None if graph_ms is None else batch / (graph_ms / 1e3) / roofline
    return BatchResult(batch, rates, tokens_per_s, batch / tokens_per_s * 1e3, step_bytes,
                       roofline, tokens_per_s / roofline, graph_ms, graph_fraction)


def targets(results: list, judged: bool) -> list[dict]:
    """Issue 10's targets at the smallest and largest batch measured, and whether they
    were met (None where not judged: a smoke run on the CPU)."""
    by_batch = sorted(results, key=lambda r: r.batch)
    return [{"batch": r.batch, "fraction": fraction,
             "met": r.fraction_of_roofline >= fraction if judged else None}
            for r, fraction in ((by_batch[0], TARGET_FRACTIONS["smallest"]),
                                (by_batch[-1], TARGET_FRACTIONS["largest"]))]


def print_table(report: dict) -> None:
    print(f"device: {report['device']}  dtype: {report['dtype']}  engine decode: "
          f"{report['engine_decode']}, async scheduling "
          f"{'on' if report['async_scheduling'] else 'off'}  weights: "
          f"{report['weight_bytes'] / 1e9:.3f} GB  copy BW: "
          f"{report['copy_bandwidth_GBps']:.1f} GB/s"
          + ("  (TINY SMOKE RUN: numbers mean nothing)" if report["tiny"] else ""))
    header = (f"{'batch':>5} {'tok/s':>10} {'step ms':>8} {'MB/step':>9} {'roofline':>10} "
              f"{'of roof':>8} {'graph ms':>9} {'graph of roof':>14}")
    print(header)
    print("-" * len(header))
    for r in report["results"]:
        graph = (f"{r['graph_step_ms']:9.3f} {r['graph_fraction_of_roofline']:14.1%}"
                 if r["graph_step_ms"] is not None else f"{'n/a':>9} {'n/a':>14}")
        print(f"{r['batch']:5d} {r['tokens_per_s']:10.1f} {r['step_ms']:8.3f} "
              f"{r['bytes_per_step'] / 1e6:9.1f} {r['roofline_tokens_per_s']:10.1f} "
              f"{r['fraction_of_roofline']:8.1%} {graph}")
    for target in report["targets"]:
        verdict = {True: "PASS", False: "FAIL", None: "n/a"}[target["met"]]
        print(f"target: >= {target['fraction']:.0%} of roofline at batch {target['batch']}: "
              f"{verdict}")


def plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = report["results"]
    x = range(len(rows))
    series = [(f"engine ({report['engine_decode']})", [r["tokens_per_s"] for r in rows],
               "tab:blue")]
    if all(r["graph_step_ms"] is not None for r in rows):
        series.append(("forward as CUDA graph",
                       [r["batch"] / (r["graph_step_ms"] / 1e3) for r in rows], "tab:orange"))
    series.append(("roofline (bytes / copy BW)", [r["roofline_tokens_per_s"] for r in rows],
                   "tab:gray"))
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(8, 5))
    for k, (label, values, color) in enumerate(series):
        offset = (k - (len(series) - 1) / 2) * width
        ax.bar([i + offset for i in x], values, width, label=label, color=color)
    engine_offset = -(len(series) - 1) / 2 * width
    for i, r in zip(x, rows):
        ax.annotate(f"{r['fraction_of_roofline']:.0%}", (i + engine_offset, r["tokens_per_s"]),
                    ha="center", va="bottom", fontsize=8)
    ax.set_yscale("log")
    ax.set_xticks(list(x), [f"batch {r['batch']}" for r in rows])
    ax.set_ylabel("decode tokens/s")
    ax.set_title(f"shardline decode, {report['model']}, {report['dtype']}\n{report['device']}"
                 + (" (tiny smoke run)" if report["tiny"] else ""), fontsize=10)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def add_model_args(parser: argparse.ArgumentParser, tiny_help: str) -> None:
    """--device, --tiny and --dtype: what the decode scripts run on (see refuse_unrunnable)."""
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--tiny", action="store_true", help=tiny_help)
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"),
                        default="bfloat16")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_args(parser, "tiny model and plan: a smoke run of every code path")
    parser.add_argument("--runs", type=int, default=None, help="timed runs per batch size")
    parser.add_argument("--enforce-eager", action="store_true",
                        help="run the engine's decode op by op instead of from CUDA graphs")
    parser.add_argument("--async-scheduling", choices=("on", "off"), default="on",
                        help="schedule step N+1 while the GPU runs step N (the engine's "
                             "default on a GPU) or one step at a time (default: %(default)s)")
    parser.add_argument("--out-dir", type=Path, default=None,
                        help="where e2e_decode.json / .png go (default bench/results; a "
                             "temporary folder for --tiny)")
    return parser.parse_args()


def refuse_unrunnable(args: argparse.Namespace, script: str) -> None:
    """Exit saying why, where --device and --tiny ask for what cannot run here: a GPU
    where none is, the 1B model on the CPU, the kernels while SHARDLINE_DISABLE_TRITON=1
    would swap in their torch references."""
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit(f"bench/{script} runs decode on a CUDA GPU (H100 / H200) and none is "
                 "visible. Use --tiny --device cpu for a smoke run on the CPU.")
    if args.device == "cpu" and not args.tiny:
        sys.exit("--device cpu runs only with --tiny: a 1B-parameter model would take hours")
    if os.environ.get("SHARDLINE_DISABLE_TRITON") == "1" and args.device == "cuda":
        sys.exit("SHARDLINE_DISABLE_TRITON=1 is set: the torch references would run "
                 "instead of the kernels; unset it.")


def main() -> None:
    args = parse_args()
    refuse_unrunnable(args, "e2e_decode.py")
    if args.runs is not None and args.runs < 1:
        sys.exit(f"--runs={args.runs} is invalid: must be >= 1")
    os.environ["SHARDLINE_DEVICE"] = args.device   # the worker's device
    from shardline.config import resolve_dtype
    from shardline.engine.llm import LLM

    device = torch.device(args.device, 0) if args.device == "cuda" else torch.device("cpu")
    dtype = resolve_dtype(args.dtype)
    shape, plan = (TINY, TINY_PLAN) if args.tiny else (LLAMA_3_2_1B, FULL_PLAN)
    if args.runs is not None:
        plan = dataclasses.replace(plan, runs=args.runs)
    model_dir = checkpoint_dir(shape, dtype, device)
    max_batch = max(plan.batches)
    max_len = plan.prompt_len + plan.warmup_tokens + plan.timed_tokens + 2 * max_batch + 2
    llm = LLM(model_dir, dtype=args.dtype, max_model_len=max_len, max_num_seqs=max_batch,
              block_size=BLOCK_SIZE, num_kv_blocks=max_batch * -(-max_len // BLOCK_SIZE) + 8,
              enforce_eager=args.enforce_eager,
              async_scheduling=args.async_scheduling == "on")
    engine_graphs = llm.engine.executor.worker.model_runner.decode_graphs is not None
    schedule_ahead = llm.engine.scheduler.schedule_ahead
    weights = weight_bytes(llm.engine.executor.worker.model_runner.model)
    bandwidth = copy_bandwidth(Timer(device, warmup=3, reps=20),
                               1 << (24 if args.tiny else 30))
    results = []
    for batch in plan.batches:
        results.append(bench_batch(llm, batch, plan, shape, dtype, device, weights, bandwidth))
        print(f"batch {batch}: done", file=sys.stderr)
    llm.shutdown()

    import triton
    report = {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
        "tiny": args.tiny, "dtype": args.dtype, "torch": torch.__version__,
        "triton": triton.__version__,
        "triton_forced_on_cpu": os.environ.get("SHARDLINE_FORCE_TRITON") == "1",
        "engine_decode": "cuda graphs" if engine_graphs else "eager",
        "async_scheduling": schedule_ahead,
        "model": "tiny Llama" if args.tiny else "Llama-3.2-1B shape, random weights",
        "shape": asdict(shape), "plan": asdict(plan), "weight_bytes": weights,
        "copy_bandwidth_GBps": bandwidth / 1e9,
        "results": [asdict(r) for r in results],
        "targets": targets(results, judged=not args.tiny),
    }
    out_dir = args.out_dir or (Path(tempfile.mkdtemp(prefix="shardline-e2e-")) if args.tiny
                               else RESULTS_DIR)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "e2e_decode.json", report)
    plot(report, out_dir / "e2e_decode.png")
    print_table(report)
    print(f"wrote {out_dir / 'e2e_decode.json'} and {out_dir / 'e2e_decode.png'}")


if __name__ == "__main__":
    main()

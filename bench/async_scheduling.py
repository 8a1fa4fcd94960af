r"""Decode (or chunked prefill) throughput with and without async scheduling, on one rank.

With async scheduling the engine schedules step N+1, and processes step N's outputs, while
the worker computes: the engine's host time hides behind the model's. That needs the
model to run beside the engine. On a GPU that is the in-process worker (the GPU computes
while the host prepares); on the CPU it is a worker process (distributed_executor_backend
"mp" at world size 1), whose cores compute while the engine's Python runs on another.

Each mode decodes `batch` greedy requests in steady state (prompts of 128 tokens, every
timed step a decode of every request) and reports tokens/s, the median of several runs.
The ratio async / in-order compares the two modes on the same executor in the same run.
With `--prompt-len`, each mode instead prefills one prompt of that many tokens, in chunks
of `--max-num-batched-tokens`, up to its first token (async scheduling sends each chunk
while the one before runs), and reports prompt tokens/s.

    python bench/async_scheduling.py                  # tiny-llama, batch 1/16/64, 5 runs
    python bench/async_scheduling.py --model small-llama -tp 2
    python bench/async_scheduling.py --quick          # batch 1 and 16, 2 short runs
    python bench/async_scheduling.py --model small-llama --prompt-len 2040 \
        --max-num-batched-tokens 256                  # chunked prefill

Results: bench/results/async_scheduling.json and .png, async_scheduling_tp2.* for -tp 2,
async_scheduling_prefill.* with --prompt-len (`--out-dir` elsewhere).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from shardline import LLM, SamplingParams

RESULTS = Path(__file__).resolve().parent / "results"
PROMPT_LEN = 128
WARMUP_STEPS = 4


def executor_backend(device: str) -> str:
    """Where the worker computes beside the engine: in process on a GPU, else in its own
    process."""
    return "uni" if device == "cuda" else "mp"


def decode_rate(llm: LLM, batch: int, steps: int, run: int) -> float:
    """Tokens/s of `steps` decode steps of `batch` requests, after their prefill and
    WARMUP_STEPS decode steps; the requests are aborted afterwards."""
    gen = torch.Generator().manual_seed(run)
    vocab = llm.engine.vocab_size
    params = SamplingParams(temperature=0.0, ignore_eos=True,
                            max_tokens=WARMUP_STEPS + steps + batch + 8)
    ids = [f"b{batch}-r{run}-{i}" for i in range(batch)]
    for req_id in ids:
        llm.add_request(req_id, torch.randint(3, vocab, (PROMPT_LEN,), generator=gen).tolist(),
                        params)
    generated = dict.fromkeys(ids, 0)
    while min(generated.values()) < WARMUP_STEPS:
        for out in llm.step():
            generated[out.request_id] = len(out.outputs[0].token_ids)
    start = time.perf_counter()
    for _ in range(steps):
        outputs = llm.step()
        if len(outputs) != batch:
            raise RuntimeError(f"a timed step advanced {len(outputs)} of {batch} requests: "
                               "not in steady-state decode")
    seconds = time.perf_counter() - start
    for req_id in ids:
        llm.abort_request(req_id)
    llm.engine.collect_idle_steps()
    return batch * steps / seconds


def prefill_rate(llm: LLM, prompt_len: int, run: int) -> float:
    """Prompt tokens/s of one prompt of `prompt_len` tokens, computed in chunks of the
    engine's token budget, from its arrival to its first token."""
    gen = torch.Generator().manual_seed(run)
    prompt = torch.randint(3, llm.engine.vocab_size, (prompt_len,), generator=gen).tolist()
    params = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=1)
    start = time.perf_counter()
    llm.add_request(f"p{prompt_len}-r{run}", prompt, params)
    while not any(out.finished for out in llm.step()):
        pass
    seconds = time.perf_counter() - start
    llm.engine.collect_idle_steps()
    return prompt_len / seconds


def bench(model: str, device: str, tp: int, cases: tuple[int, ...], runs: int,
          rate: Callable[[LLM, int, int], float], key: str, **options) -> list[dict]:
    """Per case (a batch size, or a prompt length: `key`), the median tokens/s that
    `rate(llm, case, run)` gives in each mode; both modes' engines stay up for the whole
    run and take turns, run by run, so that drift of the machine's speed falls on both
    alike."""
    backend = executor_backend(device) if tp == 1 else "mp"
    llms = {}
    for mode, wanted in (("in order", False), ("async", True)):
        llms[mode] = LLM(model, device=device, distributed_executor_backend=backend,
                         tensor_parallel_size=tp, async_scheduling=wanted,
                         enable_prefix_caching=False, **options)
        assert llms[mode].engine.scheduler.schedule_ahead == wanted
    rows = []
    try:
        for case in cases:
            rates: dict[str, list[float]] = {mode: [] for mode in llms}
            for run in range(runs + 1):   # run 0 warms up
                for mode, llm in llms.items():
                    value = rate(llm, case, run)
                    if run:
                        rates[mode].append(value)
            row = {key: case, "backend": backend}
            for mode, values in rates.items():
                row[mode] = {"tokens_per_s": statistics.median(values),
                             "runs": [round(v, 1) for v in values]}
            row["async_over_in_order"] = (row["async"]["tokens_per_s"]
                                          / row["in order"]["tokens_per_s"])
            rows.append(row)
            print(f"{key} {case:4d}: in order {row['in order']['tokens_per_s']:8.1f} tok/s, "
                  f"async {row['async']['tokens_per_s']:8.1f} tok/s, "
                  f"ratio {row['async_over_in_order']:.2f}", file=sys.stderr, flush=True)
    finally:
        for llm in llms.values():
            llm.shutdown()
    return rows


def plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows, key = report["results"], report["case"]
    labels = [str(r[key]) for r in rows]
    x = range(len(rows))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for offset, mode in ((-0.2, "in order"), (0.2, "async")):
        ax.bar([i + offset for i in x], [r[mode]["tokens_per_s"] for r in rows], width=0.4,
               label=mode)
    for i, r in zip(x, rows):
        ax.annotate(f"{r['async_over_in_order']:.2f}x", (i + 0.2, r["async"]["tokens_per_s"]),
                    ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(x), labels)
    ax.set_xlabel(key.replace("_", " ") if key != "batch" else "decode batch")
    ax.set_ylabel("tokens/s")
    ax.set_title(f"async scheduling, {report['model']} TP{report['tensor_parallel_size']} "
                 f"on {report['device']} ({report['executor']} executor)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny-llama", help="a preset or model directory")
    parser.add_argument("--device", choices=("cpu", "cuda"),
                        default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                        help="ranks of the replica; above 1 the sampled tokens of a step "
                             "ahead are broadcast to them (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="batch 1 and 16, short runs")
    parser.add_argument("--prompt-len", type=int, nargs="+",
                        help="time the chunked prefill of one prompt of each length instead "
                             "of decoding")
    parser.add_argument("--max-num-batched-tokens", type=int, default=256,
                        help="the prefill's chunk, with --prompt-len (default: %(default)s)")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    args = parser.parse_args()
    batches, steps, runs = ((1, 16), 30, 2) if args.quick else ((1, 16, 64), 100, 5)
    tp = args.tensor_parallel_size
    if args.prompt_len:
        key, cases, stem = "prompt_len", tuple(args.prompt_len), "async_scheduling_prefill"
        rows = bench(args.model, args.device, tp, cases, runs, prefill_rate, key,
                     max_model_len=max(cases) + 1, max_num_seqs=1,
                     max_num_batched_tokens=args.max_num_batched_tokens)
    else:
        key, cases = "batch", batches
        stem = "async_scheduling" if tp == 1 else f"async_scheduling_tp{tp}"
        rows = bench(args.model, args.device, tp, batches, runs,
                     lambda llm, batch, run: decode_rate(llm, batch, steps, run), key,
                     max_num_seqs=max(batches),
                     max_model_len=PROMPT_LEN + WARMUP_STEPS + steps + max(batches) + 16)
    report = {"command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
              "device": (torch.cuda.get_device_name() if args.device == "cuda"
                         else platform.processor() or platform.machine()),
              "cpus": os.cpu_count(), "torch": torch.__version__, "model": args.model,
              "executor": rows[0]["backend"], "tensor_parallel_size": args.tensor_parallel_size,
              "case": key, "runs": runs, "load_average": os.getloadavg(), "results": rows}
    if args.prompt_len:
        report["max_num_batched_tokens"] = args.max_num_batched_tokens
    else:
        report.update(prompt_len=PROMPT_LEN, steps=steps)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = args.out_dir / stem
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2))
    plot(report, stem.with_suffix(".png"))
    print(f"{key:>10} {'in order tok/s':>15} {'async tok/s':>12} {'ratio':>6}")
    for r in rows:
        print(f"{r[key]:10d} {r['in order']['tokens_per_s']:15.1f} "
              f"{r['async']['tokens_per_s']:12.1f} {r['async_over_in_order']:6.2f}")
    print(f"wrote {stem.with_suffix('.json')} and .png")


if __name__ == "__main__":
    main()

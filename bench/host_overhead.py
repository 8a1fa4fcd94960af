"""Host time per decode step: everything the engine does around the model's forward.

On a GPU, a decode step replayed from a CUDA graph costs the device about a millisecond
for a 1B model, and the engine's Python work (scheduling, building the step's inputs,
sampling bookkeeping, detokenizing, building outputs) runs between the steps, not beside
them. So that host time adds directly to every step, and at batch 1 it decides whether
decode gets near the memory roofline. It does not depend on the device, so it is measured
here on the CPU: the engine runs `tiny-llama` in steady-state decode, greedy and sampled
(temperature 0.8), and the time spent inside the model's forward and logits is subtracted
from each step.

    python bench/host_overhead.py            # batch 1, 16, 64; 5 runs of 200 steps each
    python bench/host_overhead.py --quick    # batch 1 and 16; 2 runs of 40 steps

Results: bench/results/host_overhead.json and .png (`--out-dir` elsewhere).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Callable

import torch

from shardline import LLM, SamplingParams
from shardline.worker import model_runner

RESULTS = Path(__file__).resolve().parent / "results"
PROMPT_LEN = 128
MODEL_PARTS = ("model forward", "logits")
MODES = {"greedy": 0.0, "sampled": 0.8}   # temperature


def time_into(counter: Counter, label: str, fn: Callable) -> Callable:
    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            counter[label] += time.perf_counter() - start
    return timed


def instrument(llm: LLM, counter: Counter) -> None:
    """Wrap the step's parts so their time lands in `counter` (seconds per label)."""
    engine = llm.engine
    runner = engine.executor.worker.model_runner
    parts = [(engine.scheduler, "schedule", "schedule"),
             (engine.scheduler, "update", "scheduler update"),
             (engine.outputs, "process", "outputs + detokenize"),
             (runner, "update_states", "worker request state"),
             (model_runner, "build_step_inputs", "build step inputs"),
             (runner, "_sampling_batch", "sampling batch"),
             (runner, "sampler", "sampler"),
             (runner.model, "forward", "model forward"),
             (runner.model, "compute_logits", "logits")]
    for owner, name, label in parts:
        setattr(owner, name, time_into(counter, label, getattr(owner, name)))


def measure(batch: int, temperature: float, steps: int, run: int) -> dict:
    """One run: `batch` requests decoding together for `steps` timed steps."""
    llm = LLM("tiny-llama", max_num_seqs=max(batch, 1), max_model_len=PROMPT_LEN + steps + 64)
    counter: Counter = Counter()
    gen = torch.Generator().manual_seed(run)
    vocab = llm.engine.vocab_size
    params = SamplingParams(temperature=temperature, ignore_eos=True, max_tokens=steps + 32)
    for i in range(batch):
        llm.add_request(f"r{i}", torch.randint(3, vocab, (PROMPT_LEN,), generator=gen).tolist(),
                        params)
    while llm.engine.scheduler.stats.num_steps < 4:
        llm.step()
    instrument(llm, counter)
    start = time.perf_counter()
    for _ in range(steps):
        if len(llm.step()) != batch:
            raise RuntimeError(f"a timed step did not advance all {batch} requests")
    step_s = (time.perf_counter() - start) / steps
    llm.shutdown()
    per_step = {label: seconds / steps * 1e6 for label, seconds in counter.items()}
    host_us = step_s * 1e6 - sum(per_step.pop(p, 0.0) for p in MODEL_PARTS)
    per_step["other engine code"] = host_us - sum(per_step.values())
    return {"step_us": step_s * 1e6, "host_us": host_us, "parts_us": per_step}


def bench(batches: tuple[int, ...], steps: int, runs: int) -> list[dict]:
    rows = []
    for mode, batch in ((m, b) for m in MODES for b in batches):
        results = [measure(batch, MODES[mode], steps, run) for run in range(runs)]
        median = statistics.median_low(r["host_us"] for r in results)
        chosen = next(r for r in results if r["host_us"] == median)
        rows.append({"mode": mode, "batch": batch, "host_us": median,
                     "host_us_runs": [round(r["host_us"], 1) for r in results],
                     "host_us_per_request": median / batch,
                     "step_us": chosen["step_us"], "parts_us": chosen["parts_us"]})
        print(f"{mode:7s} batch {batch:3d}: host {median:8.1f} us/step "
              f"({median / batch:6.1f} us per request), runs {rows[-1]['host_us_runs']}",
              file=sys.stderr, flush=True)
    return rows


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    labels = sorted({k for r in rows for k in r["parts_us"]},
                    key=lambda k: -max(r["parts_us"].get(k, 0.0) for r in rows))
    fig, ax = plt.subplots(figsize=(8, 5))
    bottoms = [0.0] * len(rows)
    for label in labels:
        values = [r["parts_us"].get(label, 0.0) for r in rows]
        ax.bar([f"{r['mode']}\n{r['batch']}" for r in rows], values, bottom=bottoms,
               label=label)
        bottoms = [b + v for b, v in zip(bottoms, values)]
    ax.set_xlabel("sampling, decode batch")
    ax.set_ylabel("host time per step (us)")
    ax.set_title("shardline host time per decode step, by part (CPU, tiny-llama)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="batch 1 and 16, short runs")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    args = parser.parse_args()
    batches, steps, runs = ((1, 16), 40, 2) if args.quick else ((1, 16, 64), 200, 5)
    rows = bench(batches, steps, runs)
    report = {"command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
              "machine": platform.processor() or platform.machine(),
              "cpus": torch.get_num_threads(), "torch": torch.__version__,
              "model": "tiny-llama", "prompt_len": PROMPT_LEN, "steps": steps, "runs": runs,
              "results": rows}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "host_overhead.json").write_text(json.dumps(report, indent=2))
    plot(rows, args.out_dir / "host_overhead.png")
    print(f"{'mode':>7} {'batch':>5} {'host us/step':>13} {'us/request':>11}  largest parts")
    for r in rows:
        top = sorted(r["parts_us"].items(), key=lambda kv: -kv[1])[:3]
        print(f"{r['mode']:>7} {r['batch']:5d} {r['host_us']:13.1f} "
              f"{r['host_us_per_request']:11.1f}  " + ", ".join(f"{k} {v:.0f}" for k, v in top))
    print(f"wrote {args.out_dir / 'host_overhead.json'} and .png")


if __name__ == "__main__":
    main()

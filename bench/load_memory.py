"""Peak resident memory of each rank while it loads its weights, at TP=1 and TP=4.

Each rank should read only its own slices of the checkpoint, so that its memory while
loading is about its share of the weights, never a whole tensor. Every rank here runs
`LoadMemoryWorker`, the model worker with its `load_model` measured: just before loading
it resets the process's peak RSS to the current RSS (`/proc/self/clear_refs`), and after
loading it reads the peak (VmHWM in `/proc/self/status`), so "peak over start" is
the most memory the load itself added at any moment. It is compared with the bytes of
the rank's parameters. Both layouts run one worker process per rank (the multi-process
executor, also at TP=1), each executor started afresh per run.

    python bench/load_memory.py          # small-llama at hidden 1024 (~200 MB fp32), 3 runs
    python bench/load_memory.py --quick  # tiny-llama, 1 run

Results: bench/results/load_memory.json (`--out-dir` elsewhere).
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

from shardline.worker.worker import Worker

RESULTS = Path(__file__).resolve().parent / "results"
MiB = 1 << 20
# small-llama (8 layers, 8 heads of 64, 4 KV heads) widened: about 50M parameters.
WIDE_VARIANT = dict(hidden_size=1024, intermediate_size=1536)


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_rss() -> None:
    """Make the process's peak RSS (VmHWM) its current RSS (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss_bytes() -> int:
    """The process's peak RSS since reset_peak_rss (VmHWM). Not getrusage's ru_maxrss: a
    spawned process's starts at its parent's RSS (the kernel carries the peak of the
    address space it replaced at exec), which no reset clears, so a worker of a large
    engine process would report the engine's size."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/self/status has no VmHWM line")


class LoadMemoryWorker(Worker):
    """The model worker, with the memory and time of its load_model recorded."""

    def load_model(self) -> None:
        reset_peak_rss()
        start_rss = current_rss_bytes()
        began = time.perf_counter()
        super().load_model()
        elapsed = time.perf_counter() - began
        peak = peak_rss_bytes()
        params = self.model_runner.model.parameters()
        self._load_report = {"rank": self.rank, "start_rss_bytes": start_rss,
                             "peak_rss_bytes": peak, "peak_over_start_bytes": peak - start_rss,
                             "end_rss_bytes": current_rss_bytes(), "load_s": elapsed,
                             "weight_bytes": sum(p.numel() * p.element_size() for p in params)}

    def load_report(self) -> dict:
        return self._load_report


def measure_once(model_dir: str, tp: int) -> list[dict]:
    """Start an executor of `tp` ranks (one process each), return each rank's report."""
    from shardline.config import (CacheConfig, EngineConfig, ModelConfig, ParallelConfig,
                                  SchedulerConfig)
    from shardline.executor import create_executor

    parallel = ParallelConfig(tensor_parallel_size=tp, device="cpu",
                              distributed_executor_backend="mp",
                              worker_cls="load_memory.LoadMemoryWorker")
    config = EngineConfig(ModelConfig(model_dir, dtype="float32"), CacheConfig(num_blocks=4),
                          SchedulerConfig(), parallel)
    executor = create_executor(config)
    try:
        return executor.collective_rpc("load_report")
    finally:
        executor.shutdown()


def summarize(tp: int, runs: list[list[dict]]) -> dict:
    """Per rank: medians over runs of the peak over start; the weight bytes are fixed."""
    ranks = []
    for rank in range(tp):
        reports = [run[rank] for run in runs]
        peak = statistics.median(r["peak_over_start_bytes"] for r in reports)
        weights = reports[0]["weight_bytes"]
        ranks.append({"rank": rank, "weight_bytes": weights, "peak_over_start_bytes": peak,
                      "peak_over_weights": peak / weights,
                      "peak_rss_bytes": statistics.median(r["peak_rss_bytes"] for r in reports),
                      "start_rss_bytes": statistics.median(r["start_rss_bytes"] for r in reports),
                      "load_s": statistics.median(r["load_s"] for r in reports),
                      "peak_over_start_runs": [r["peak_over_start_bytes"] for r in reports]})
    return {"tp": tp, "ranks": ranks,
            "max_peak_over_start_bytes": max(r["peak_over_start_bytes"] for r in ranks),
            "max_weight_bytes": max(r["weight_bytes"] for r in ranks)}


def measure(model: str, tps: list[int], runs: int) -> dict:
    from shardline.presets import build_variant, resolve_model

    model_dir = build_variant("small-llama", **WIDE_VARIANT) if model == "wide" \
        else resolve_model(model)
    checkpoint_bytes = sum(os.path.getsize(os.path.join(model_dir, f))
                           for f in os.listdir(model_dir) if f.endswith(".safetensors"))
    load_before = os.getloadavg()
    results = []
    for tp in tps:
        reports = []
        for r in range(runs):
            reports.append(measure_once(model_dir, tp))
            worst = max(rep["peak_over_start_bytes"] for rep in reports[-1])
            print(f"TP={tp} run {r + 1}/{runs}: busiest rank peaked {worst / MiB:.1f} MiB over "
                  "its start", file=sys.stderr, flush=True)
        results.append(summarize(tp, reports))
    return {"bench": "load_memory", "model": model,
            "variant": WIDE_VARIANT if model == "wide" else None, "dtype": "float32",
            "checkpoint_bytes": checkpoint_bytes, "runs": runs,
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                        "load_avg_before": load_before, "load_avg_after": os.getloadavg()},
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
            "results": results}


def print_table(result: dict) -> None:
    print(f"checkpoint: {result['checkpoint_bytes'] / MiB:.1f} MiB")
    print(f"{'TP':>3} {'rank':>4} {'weights MiB':>12} {'peak over start MiB':>20} {'ratio':>6}")
    for layout in result["results"]:
        for r in layout["ranks"]:
            print(f"{layout['tp']:>3} {r['rank']:>4} {r['weight_bytes'] / MiB:12.1f} "
                  f"{r['peak_over_start_bytes'] / MiB:20.1f} {r['peak_over_weights']:6.2f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny-llama, one run")
    parser.add_argument("--model", help="preset or model directory; 'wide' (the default) is "
                        "small-llama widened to hidden 1024")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    args = parser.parse_args()
    model, runs = ("tiny-llama", 1) if args.quick else ("wide", 3)
    result = measure(args.model or model, [1, 4], runs)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "load_memory.json").write_text(json.dumps(result, indent=2) + "\n")
    print_table(result)
    print(f"results in {args.out_dir / 'load_memory.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

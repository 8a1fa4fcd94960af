"""Decode speed with torch's OpenMP threads spinning between ops, spinning briefly, or
sleeping, on an idle machine and beside other busy processes.

On the CPU the one rank runs in the engine's process with torch's intra-op pool, a thread
per core. By default libgomp's threads spin for a while (GOMP_SPINCOUNT 300000) after each
op before they sleep; when other work needs the cores, the spinning threads take the time
the next op's threads need. The `shardline` commands therefore set GOMP_SPINCOUNT=10000
unless the user chose a spin count or a wait policy. Each run is a command in a fresh
process (OpenMP reads these when torch loads it), with the command's own default bypassed
so that every variant's environment is exactly the one stated:

- spinning: no OpenMP settings (libgomp's default), a thread per core;
- short spin: GOMP_SPINCOUNT=10000 (what the commands now run);
- sleeping: OMP_WAIT_POLICY=PASSIVE;
- one thread: OMP_NUM_THREADS=1.

Two workloads: `shardline demo` (three chat questions to SmolLM2-135M, decode of 3
sequences: latency-bound) and `shardline bench` offline on small-llama (32 requests:
throughput-bound). `--busy N` runs N processes that spin on a core each beside the command
(other work on the machine); the variants alternate within each round, so they meet the
same conditions.

    python bench/omp_wait_policy.py                   # busy 0 and 2, 3 rounds (about 10 min)
    python bench/omp_wait_policy.py --busy 0,1,2 --rounds 5 --workloads demo

Results: bench/results/omp_wait_policy.json (`--out-dir` elsewhere): output tokens/s per
run and the median per workload, load and variant, with its ratio to spinning.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from _machine import machine_info

RESULTS = Path(__file__).resolve().parent / "results"
VARIANTS = {"spinning": {}, "short spin": {"GOMP_SPINCOUNT": "10000"},
            "sleeping": {"OMP_WAIT_POLICY": "PASSIVE"}, "one thread": {"OMP_NUM_THREADS": "1"}}
OPENMP_SETTINGS = ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "GOMP_SPINCOUNT")
# A command without cli.main, which would set the spin count for every variant.
_COMMAND = ("import sys; from shardline.cli import build_parser; "
            "args = build_parser().parse_args(sys.argv[1:]); sys.exit(args.func(args))")


def spin() -> None:
    while True:
        pass


def workload_argv(workload: str, model: str, max_tokens: int, scratch: Path) -> list[str]:
    if workload == "demo":
        return ["demo", "--model", model, "--max-tokens", str(max_tokens), "--device", "cpu"]
    return ["bench", "--model", "small-llama", "--num-prompts", "32", "--no-progress",
            "--device", "cpu", "--out", str(scratch / "bench.jsonl")]


def tokens_per_s(workload: str, argv: list[str], variant: dict[str, str]) -> float:
    env = {k: v for k, v in os.environ.items() if k not in OPENMP_SETTINGS}
    done = subprocess.run([sys.executable, "-c", _COMMAND, *argv], env={**env, **variant},
                          capture_output=True, text=True, timeout=900)
    pattern = r"([0-9.]+) tokens/s" if workload == "demo" else r'"output_tokens_per_s": ([0-9.]+)'
    found = re.search(pattern, done.stdout)
    if done.returncode or not found:
        raise RuntimeError(f"{workload} with {variant or 'no OpenMP settings'} failed "
                           f"(exit {done.returncode}): {done.stderr[-2000:]}")
    return float(found.group(1))


def measure(workload: str, argv: list[str], busy: int, rounds: int) -> dict:
    spinners = [multiprocessing.Process(target=spin, daemon=True) for _ in range(busy)]
    for process in spinners:
        process.start()
    try:
        runs: dict[str, list[float]] = {name: [] for name in VARIANTS}
        for round_ in range(rounds):
            for name, variant in VARIANTS.items():
                runs[name].append(tokens_per_s(workload, argv, variant))
                print(f"{workload}, busy {busy}, round {round_ + 1}/{rounds}, {name}: "
                      f"{runs[name][-1]:.1f} tokens/s", flush=True)
    finally:
        for process in spinners:
            process.kill()
            process.join()
    medians = {name: statistics.median(values) for name, values in runs.items()}
    return {"workload": workload, "busy_processes": busy, "runs_tokens_per_s": runs,
            "median_tokens_per_s": medians,
            "ratio_to_spinning": {name: value / medians["spinning"]
                                  for name, value in medians.items()}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--busy", default="0,2",
                        help="comma-separated counts of busy processes beside the command")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workloads", default="demo,batch", help="demo, batch or both")
    parser.add_argument("--model", default="smollm2-135m-instruct", help="the demo's model")
    parser.add_argument("--max-tokens", type=int, default=64, help="the demo's answers")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    args = parser.parse_args()
    levels = [int(level) for level in args.busy.split(",")]
    workloads = args.workloads.split(",")
    if args.rounds < 1 or any(level < 0 for level in levels):
        parser.error(f"--rounds {args.rounds} and --busy {args.busy} must be >= 1 and >= 0")
    if not set(workloads) <= {"demo", "batch"}:
        parser.error(f"--workloads {args.workloads}: use demo, batch or demo,batch")
    with tempfile.TemporaryDirectory() as scratch:
        loads = [measure(workload, workload_argv(workload, args.model, args.max_tokens,
                                                 Path(scratch)), level, args.rounds)
                 for workload in workloads for level in levels]
    result = {"bench": "omp_wait_policy", "demo_model": args.model,
              "demo_max_tokens": args.max_tokens, "rounds": args.rounds,
              "machine": machine_info("the command and the busy processes share these cores",
                                      {}),
              "loads": loads}
    for load in loads:
        print(f"{load['workload']}, busy {load['busy_processes']}: " + ", ".join(
            f"{name} {value:.1f} tokens/s ({load['ratio_to_spinning'][name]:.2f}x)"
            for name, value in load["median_tokens_per_s"].items()))
    args.out_dir.mkdir(parents=True, exist_ok=True)
    path = args.out_dir / "omp_wait_policy.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"results in {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

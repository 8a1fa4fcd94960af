"""The Ray executor's own time per step against the multi-process executor's, no model.

Every rank runs bench/executor.py's `NoOpWorker`, and each step is the same decode batch,
so what is timed is the control plane: under Ray, one Ray call per node to the node's
agent, the agent's write into the node's broadcast ring, the output rank's reply on its
response ring, and the agent's answer back over Ray. Ray runs locally, one node (the
extra per-step cost of a second node is one more Ray call).

    python bench/ray_executor.py            # 1 and 2 TP ranks; 5 runs of 500 steps
    python bench/ray_executor.py --quick    # 1 and 2 TP ranks; 3 runs of 100 steps

Results: bench/results/ray_executor.json (`--out-dir` elsewhere): medians over runs of
the mean time per step, for each executor, measured in the same process.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from executor import parse_args, time_executor  # noqa: E402  (bench/executor.py)


def main() -> int:
    args = parse_args(__doc__, "fewer runs and steps")
    steps, runs = (100, 3) if args.quick else (500, 5)

    import ray

    # The actors import NoOpWorker from bench/, as the spawned workers do.
    ray.init(num_cpus=4, include_dashboard=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(HERE)}})
    rows = []
    try:
        for workers in (1, 2):
            for backend in ("mp", "ray"):
                times = time_executor(workers, args.batch, steps, runs, backend)
                median = statistics.median(times)
                rows.append({"executor": backend, "workers": workers, "us_per_step": median,
                             "runs_us": times})
                print(f"{backend:3s} {workers} workers: {median:8.1f} us/step", flush=True)
    finally:
        ray.shutdown()
    result = {"bench": "ray_executor", "batch": args.batch, "steps_per_run": steps,
              "runs": runs, "ray": ray.__version__,
              "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                          "load_average": os.getloadavg()},
              "rows": rows}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "ray_executor.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"results in {args.out_dir / 'ray_executor.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

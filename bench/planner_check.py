"""The planner's predictions against measured CPU layouts: step time and tokens/s.

Measures this machine's profile (shardline plan --profile: matmul rate, the rate
decode matmuls stream weights at, the engine's host time per step and per layer and the
reference attention's rate, shared-memory and gloo all-reduce), then predicts each
layout of a bench/layouts.py result for the same model and workload, and prints the
ratio predicted / measured per layout (the target is within 1.5x either way).

    python bench/planner_check.py                  # profile now, compare with bench/results/layouts.json
    python bench/planner_check.py --run-layouts    # rerun bench/layouts.py, profile before and after
    python bench/planner_check.py --profile-file P # use a profile written earlier

The measured step is the engine's median llm.step() (a decode step; with PP, one of the
microbatches kept in flight); the predicted one is the planner's decode step of the
busiest stage. With --run-layouts the profile is measured before and after the layouts
and their means predict, so that a drift in the machine's speed meanwhile weighs on both
sides. Writes bench/results/planner_check.json (and, with --run-layouts, the layouts it
measured in bench/results/planner_check_layouts/).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from shardline.planner.cluster import profile_cluster
from shardline.planner.cost import Layout, Workload
from shardline.planner.model_spec import load_spec
from shardline.planner.profile import write_profile
from shardline.planner.ranking import estimate

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"
TARGET = 1.5


def predict(measured: dict, profile_path: str) -> list[dict]:
    """One row per measured layout: predicted and measured step time and tokens/s."""
    model = load_spec(measured["model"], measured["dtype"])
    workload = Workload(batch=measured["num_prompts"], prompt_len=measured["prompt_len"],
                        output_len=measured["max_tokens"])
    rows = []
    for r in measured["results"]:
        layout = Layout(tp=r["tp"], pp=r["pp"], dp=r.get("dp", 1),
                        expert_parallel=r.get("expert_dispatch") is not None)
        cluster = profile_cluster(profile_path, nodes=1, devices_per_node=layout.world_size)
        e = estimate(model, layout, cluster, workload)
        step_ms = e.decode.time_s * 1e3
        rows.append({"layout": r["layout"], "ranks": layout.world_size,
                     "predicted_step_ms": step_ms, "measured_step_ms": r["step_ms"],
                     "step_ratio": step_ms / r["step_ms"],
                     "predicted_compute_ms": e.decode.compute_s * 1e3,
                     "predicted_host_ms": e.decode.host_s * 1e3,
                     "predicted_comm_ms": e.decode.comm.time_s * 1e3,
                     "predicted_tokens_per_s": e.throughput,
                     "measured_tokens_per_s": r["tokens_per_s"],
                     "tokens_per_s_ratio": e.throughput / r["tokens_per_s"]})
    return rows


def mean_profile(profiles: list[dict]) -> dict:
    """One profile whose measured constants (floats) are the means of `profiles`'."""
    first = profiles[0]
    mean = dict(first, measured=[p["measured"] for p in profiles])
    for part in ("device", "intranode", "internode"):
        mean[part] = {k: statistics.fmean(p[part][k] for p in profiles)
                      if isinstance(v, float) else v for k, v in first[part].items()}
    return mean


def say(stage: str) -> None:
    print(f"profiling {stage} ...", file=sys.stderr, flush=True)


def within(ratio: float) -> bool:
    return 1 / TARGET <= ratio <= TARGET


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layouts-json", type=Path, default=RESULTS / "layouts.json",
                        help="a bench/layouts.py result (default: %(default)s)")
    parser.add_argument("--run-layouts", action="store_true",
                        help="rerun bench/layouts.py (into a temporary directory) first")
    parser.add_argument("--profile-file", help="a profile written earlier instead of "
                        "measuring one now")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        layouts_json = args.layouts_json
        profiles = []
        if args.run_layouts:
            if not args.profile_file:
                profiles.append(write_profile(os.path.join(tmp, "before.json"), say))
            layouts_dir = args.out_dir / "planner_check_layouts"
            subprocess.run([sys.executable, str(BENCH / "layouts.py"), "--out-dir",
                            str(layouts_dir)], check=True, timeout=1800)
            layouts_json = layouts_dir / "layouts.json"
        measured = json.loads(layouts_json.read_text())
        profile_path = args.profile_file or os.path.join(tmp, "profile.json")
        if not args.profile_file:
            profiles.append(write_profile(os.path.join(tmp, "after.json"), say))
            Path(profile_path).write_text(json.dumps(mean_profile(profiles)))
        profile = json.loads(Path(profile_path).read_text())
        rows = predict(measured, profile_path)
    result = {"bench": "planner_check", "model": measured["model"],
              "workload": {k: measured[k] for k in ("num_prompts", "prompt_len", "max_tokens")},
              "layouts_json": str(layouts_json), "layouts_measured_with": measured["command"],
              "layouts_load_avg": [measured["machine"]["load_avg_before"],
                                   measured["machine"]["load_avg_after"]],
              "profile": profile, "profiles_measured": profiles, "target_ratio": TARGET,
              "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "results": rows}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "planner_check.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'layout':>8} {'pred ms':>8} {'compute':>8} {'host':>6} {'comm':>6} "
          f"{'meas ms':>8} {'ratio':>6} {'pred tok/s':>10} {'meas tok/s':>10} {'ratio':>6}")
    for r in rows:
        print(f"{r['layout']:>8} {r['predicted_step_ms']:8.1f} {r['predicted_compute_ms']:8.1f} "
              f"{r['predicted_host_ms']:6.1f} {r['predicted_comm_ms']:6.1f} "
              f"{r['measured_step_ms']:8.1f} "
              f"{r['step_ratio']:6.2f} {r['predicted_tokens_per_s']:10.1f} "
              f"{r['measured_tokens_per_s']:10.1f} {r['tokens_per_s_ratio']:6.2f}")
    inside = sum(within(r["step_ratio"]) for r in rows)
    print(f"step time within {TARGET}x for {inside} of {len(rows)} layouts; results in "
          f"{args.out_dir / 'planner_check.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

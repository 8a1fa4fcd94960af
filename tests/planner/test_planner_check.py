"""bench/planner_check.py end to end on a given profile and layouts result (no
measurement): one row per measured layout, ratios that are predicted over measured."""

import json
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest

from shardline.planner.cluster import DeviceSpec

BENCH = Path(__file__).resolve().parents[2] / "bench"


def test_planner_check_compares_every_layout(tmp_path, fresh_seed):
    import random

    rng = random.Random(fresh_seed)
    device = DeviceSpec("CPU", 8e9, flops=1e10, memory_bandwidth=5e9, shared_by_ranks=True,
                        cores=2, flops_per_core=8e9, bandwidth_per_core=4e9,
                        attention_bandwidth=1e9, step_host_s=1e-3, step_host_per_seq_s=1e-5,
                        layer_host_s=4e-4, layer_host_per_seq_s=2e-5)
    profile = {"device": asdict(device),
               "intranode": {"latency_s": 1e-3, "bandwidth": 1e9, "name": "shared memory"},
               "internode": {"latency_s": 2e-3, "bandwidth": 5e8, "name": "gloo"},
               "devices_per_node": 2}
    shapes = {"uni": (1, 1, 1), "tp2": (2, 1, 1), "pp2": (1, 2, 1), "dp2xtp2": (2, 1, 2)}
    results = [{"layout": name, "tp": tp, "pp": pp, "dp": dp, "expert_dispatch": None,
                "step_ms": rng.uniform(10, 200), "tokens_per_s": rng.uniform(10, 200)}
               for name, (tp, pp, dp) in shapes.items()]
    layouts = {"model": "small-llama", "dtype": "float32", "num_prompts": 16,
               "prompt_len": 64, "max_tokens": 32, "command": "layouts.py",
               "machine": {"load_avg_before": [1, 1, 1], "load_avg_after": [1, 1, 1]},
               "results": results}
    (tmp_path / "profile.json").write_text(json.dumps(profile))
    (tmp_path / "layouts.json").write_text(json.dumps(layouts))
    done = subprocess.run([sys.executable, str(BENCH / "planner_check.py"), "--profile-file",
                           str(tmp_path / "profile.json"), "--layouts-json",
                           str(tmp_path / "layouts.json"), "--out-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads((tmp_path / "planner_check.json").read_text())["results"]
    assert [r["layout"] for r in rows] == list(shapes)
    for row, measured in zip(rows, results):
        assert row["measured_step_ms"] == measured["step_ms"]
        assert row["step_ratio"] == pytest.approx(row["predicted_step_ms"] / measured["step_ms"])
        assert row["predicted_step_ms"] == pytest.approx(
            row["predicted_compute_ms"] + row["predicted_host_ms"] + row["predicted_comm_ms"])
        assert row["predicted_host_ms"] > 0
    by_name = {r["layout"]: r for r in rows}
    assert by_name["uni"]["predicted_comm_ms"] == 0 < by_name["tp2"]["predicted_comm_ms"]
    assert f"{len(rows)} layouts" in done.stdout


def test_profiles_before_and_after_the_layouts_are_averaged(fresh_seed):
    import importlib.util
    import random

    spec = importlib.util.spec_from_file_location("planner_check", BENCH / "planner_check.py")
    planner_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(planner_check)
    rng = random.Random(fresh_seed)
    profiles = [{"device": asdict(DeviceSpec("CPU", 8e9, flops=rng.uniform(1e9, 1e11),
                                             memory_bandwidth=rng.uniform(1e9, 5e9),
                                             shared_by_ranks=True, cores=2)),
                 "intranode": {"latency_s": rng.uniform(1e-5, 1e-3), "bandwidth": 1e9,
                               "name": "shared memory"},
                 "internode": {"latency_s": 1e-3, "bandwidth": 5e8, "name": "gloo"},
                 "devices_per_node": 2, "measured": {"load_average": [i, i, i]}}
                for i in range(2)]
    mean = planner_check.mean_profile(profiles)
    for part, key in (("device", "flops"), ("device", "memory_bandwidth"),
                      ("intranode", "latency_s")):
        assert mean[part][key] == pytest.approx((profiles[0][part][key]
                                                 + profiles[1][part][key]) / 2)
    assert (mean["device"]["cores"], mean["device"]["shared_by_ranks"]) == (2, True)
    assert mean["intranode"]["name"] == "shared memory" and mean["devices_per_node"] == 2
    assert mean["measured"] == [p["measured"] for p in profiles]

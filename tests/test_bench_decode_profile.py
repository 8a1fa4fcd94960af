"""bench/decode_profile.py runs end to end in its CPU smoke mode (CPU ops stand in for
kernels; the numbers mean nothing) and its JSON holds what a GPU run is read for: every op
of the decode forward with its calls, time and bytes, the bytes adding up to the
roofline's (every GEMM weight and the context's K/V), and per-op times that fit in the
step they were measured in."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
ITEMSIZE = {"bfloat16": 2, "float16": 2, "float32": 4}


def run_profile(out_dir: Path, *args: str) -> dict:
    # One OpenMP thread: on a busy machine spinning threads make a tiny model crawl.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(BENCH / "decode_profile.py"), "--tiny",
                           "--device", "cpu", "--out-dir", str(out_dir), *args],
                          capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return json.loads((out_dir / "decode_profile.json").read_text())


def expected_ops(shape: dict) -> dict[str, int]:
    """Calls per step of each labelled op of the tiny Llama's decode forward."""
    hidden, layers = shape["hidden"], shape["layers"]
    q, kv = shape["heads"] * shape["head_dim"], shape["kv_heads"] * shape["head_dim"]
    return {f"qkv_rotary_and_write_kv_cache[{q + 2 * kv}x{hidden}]": layers,
            "paged_decode_attention": layers,
            f"linear_rms_norm[{hidden}x{q}]": layers,
            f"linear_silu_mul[{2 * shape['intermediate']}x{hidden}]": layers,
            f"linear_rms_norm[{hidden}x{shape['intermediate']}]": layers,
            f"linear[{shape['vocab']}x{hidden}]": 1, "rms_norm": 1}


def test_decode_profile_tiny_runs_on_cpu(tmp_path):
    result = run_profile(tmp_path, "--batches", "1", "3", "--context", "20", "--steps", "2")
    assert result["device"] == "CPU" and result["tiny"] is True
    assert (result["context"], result["steps"]) == (20, 2)
    assert [r["batch"] for r in result["results"]] == result["batches"] == [1, 3]
    shape, itemsize = result["shape"], ITEMSIZE[result["dtype"]]
    bandwidth = result["copy_bandwidth_GBps"] * 1e9
    norm_bytes = (2 * shape["layers"] + 1) * shape["hidden"] * itemsize
    kv_per_token = shape["layers"] * 2 * shape["kv_heads"] * shape["head_dim"] * itemsize
    for r in result["results"]:
        # Each sequence holds its 20 prompt tokens and at least the token being decoded.
        assert r["kv_tokens"] >= r["batch"] * 21
        assert r["kv_bytes_per_step"] == r["kv_tokens"] * kv_per_token
        assert r["bytes_per_step"] == result["weight_bytes"] + r["kv_bytes_per_step"]
        assert r["floor_ms"] == pytest.approx(r["bytes_per_step"] / bandwidth * 1e3)
        assert r["eager_step_ms"] > 0 and r["graph_step_ms"] is None
        ops = {o["op"]: o for o in r["ops"]}
        for label, calls in expected_ops(shape).items():
            assert ops[label]["calls_per_step"] == calls, label
        known = [o for o in r["ops"] if o["bytes_per_call"] is not None]
        assert {o["op"] for o in known} == set(expected_ops(shape)) - {"rms_norm"}
        # The known bytes are the roofline's: every weight but the norms', and the K/V.
        assert sum(o["bytes_per_step"] for o in known) == pytest.approx(
            r["bytes_per_step"] - norm_bytes)
        assert ops["paged_decode_attention"]["bytes_per_step"] == r["kv_bytes_per_step"]
        for o in known:
            assert o["GBps"] == pytest.approx(o["bytes_per_step"] / o["us_per_step"] / 1e3)
            assert o["fraction_of_copy_bw"] == pytest.approx(o["GBps"] * 1e9 / bandwidth)
            assert o["excess_us_per_step"] == pytest.approx(
                o["us_per_step"] - o["floor_us_per_step"])
        step_us = r["profiled_step_ms"] * 1e3
        op_us = sum(o["us_per_step"] for o in r["ops"])
        assert 0 < op_us <= step_us
        assert op_us == pytest.approx(r["kernel_ms_per_step"] * 1e3)
        assert sum(k["us_per_step"] for k in r["kernels"]) == pytest.approx(op_us)
        assert r["gap_ms_per_step"] == pytest.approx(r["profiled_step_ms"]
                                                     - r["kernel_ms_per_step"])
        assert r["unattributed_kernels_per_step"] == 0
        for o in r["ops"]:
            assert sum(k["us_per_step"] for k in o["kernels"]) == pytest.approx(o["us_per_step"])
            assert o["share_of_step"] == pytest.approx(o["us_per_step"] / step_us)
        assert 0 < r["host_forward_ms"] <= r["profiled_step_ms"]

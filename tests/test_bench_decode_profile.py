"""bench/decode_profile.py runs end to end in its CPU smoke mode (CPU ops stand in for
kernels; the numbers mean nothing) and its JSON holds what a GPU run is read for: every op
of the decode forward with its calls, time and bytes, the bytes adding up to the
roofline's (every GEMM weight and the context's K/V), and per-op times that fit in the
step they were measured in. Its CUDA attribution (device kernels to the op ranges that
hold them) cannot run here, so it is checked on made-up profiler events."""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from torch.autograd import DeviceType

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
        for o in r["ops"]:
            assert sum(k["us_per_step"] for k in o["kernels"]) == pytest.approx(o["us_per_step"])
            assert o["share_of_step"] == pytest.approx(o["us_per_step"] / step_us)
        assert 0 < r["host_forward_ms"] <= r["profiled_step_ms"]


def device_event(name: str, start: float, end: float, annotation: bool = False,
                 device: DeviceType = DeviceType.CUDA) -> SimpleNamespace:
    return SimpleNamespace(name=name, device_type=device, is_user_annotation=annotation,
                           is_async=False, time_range=SimpleNamespace(start=start, end=end))


def test_device_kernels_go_to_the_innermost_op_range_holding_them(monkeypatch):
    """On CUDA a kernel's op is the device-side range of the op's record_function that
    holds it (the innermost, for nested ops, even when both start with the same kernel);
    a kernel outside every op range is a call of NO_OP, and host-side ranges (on the
    CPU's clock) and the step's range are no ops."""
    monkeypatch.syspath_prepend(str(BENCH))
    profile = __import__("decode_profile")
    op = profile.OP_PREFIX
    spans = [device_event(op + "linear[8x4]", 10, 20, True),
             device_event(op + "linear[8x4]", 30, 40, True),
             device_event(op + "attention", 40, 50, True),
             device_event(op + "outer", 60, 80, True), device_event(op + "inner", 65, 70, True),
             device_event(op + "outer", 90, 100, True), device_event(op + "inner", 90, 95, True),
             device_event(profile.STEP_LABEL, 0, 200, True),
             device_event(op + "host", 0, 200, True, DeviceType.CPU)]
    kernels = {"gemm": (10, 15), "reduce": (15, 20), "gemm2": (30, 40), "attn": (40, 50),
               "embed": (22, 25), "a": (60, 64), "b": (65, 70), "c": (72, 80), "late": (85, 86),
               "d": (90, 95), "e": (95, 100)}
    events = spans + [device_event(name, *span) for name, span in kernels.items()]
    pieces = profile.device_pieces(events)
    assert {name: label for label, _, name, _ in pieces} == {
        "gemm": "linear[8x4]", "reduce": "linear[8x4]", "gemm2": "linear[8x4]",
        "attn": "attention", "embed": profile.NO_OP, "a": "outer", "b": "inner", "c": "outer",
        "late": profile.NO_OP, "d": "inner", "e": "outer"}
    assert {name: us for _, _, name, us in pieces} == {
        name: end - start for name, (start, end) in kernels.items()}
    ops, by_name = profile.per_step_rows(pieces, 1, 200.0, {"linear[8x4]": 64}, 1e9)
    rows = {o["op"]: o for o in ops}
    assert rows["linear[8x4]"]["calls_per_step"] == 2   # two ranges, three kernels
    assert [(k["name"], k["calls_per_step"]) for k in rows["linear[8x4]"]["kernels"]] == [
        ("gemm2", 1), ("gemm", 1), ("reduce", 1)]
    assert rows["linear[8x4]"]["GBps"] == pytest.approx(2 * 64 / 20 / 1e3)
    assert rows[profile.NO_OP]["calls_per_step"] == 2 and rows["outer"]["calls_per_step"] == 2
    assert sum(k["us_per_step"] for k in by_name) == pytest.approx(sum(o["us_per_step"]
                                                                       for o in ops))

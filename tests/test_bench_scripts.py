"""The benchmark scripts run end to end in their CPU smoke modes and write their results.

Their numbers are meaningless here; what is checked is that every code path still runs
and that the JSON holds what the closing notes are read from.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def run_script(name: str, *args: str) -> None:
    done = subprocess.run([sys.executable, str(BENCH / name), *args], capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]


def test_throughput_quick_agrees_with_transformers(tmp_path):
    out = tmp_path / "throughput.json"
    run_script("throughput.py", "--quick", "--model", "tiny-llama", "--out", str(out))
    result = json.loads(out.read_text())
    assert result["greedy_agreement_first8"] == 1.0
    assert result["shardline"]["output_tokens"] == result["total_output_tokens"]
    assert out.with_suffix(".png").stat().st_size > 0


def test_e2e_decode_tiny_runs_on_cpu(tmp_path):
    run_script("e2e_decode.py", "--tiny", "--device", "cpu", "--out-dir", str(tmp_path))
    result = json.loads((tmp_path / "e2e_decode.json").read_text())
    assert result and (tmp_path / "e2e_decode.png").stat().st_size > 0


@pytest.mark.timeout(600)
def test_kernels_dry_run_covers_every_kernel(tmp_path):
    run_script("kernels.py", "--dry-run", "--out-dir", str(tmp_path))
    result = json.loads((tmp_path / "kernels.json").read_text())
    text = json.dumps(result)
    for kernel in ("matmul", "decode", "prefill", "moe"):
        assert kernel in text
    assert (tmp_path / "kernels.png").stat().st_size > 0


def test_host_overhead_quick_accounts_for_every_step(tmp_path):
    run_script("host_overhead.py", "--quick", "--out-dir", str(tmp_path))
    result = json.loads((tmp_path / "host_overhead.json").read_text())
    assert {(r["mode"], r["batch"]) for r in result["results"]} == {
        ("greedy", 1), ("greedy", 16), ("sampled", 1), ("sampled", 16)}
    for row in result["results"]:
        assert 0 < row["host_us"] < row["step_us"]
        assert sum(row["parts_us"].values()) == pytest.approx(row["host_us"])
    assert (tmp_path / "host_overhead.png").stat().st_size > 0


def test_ring_quick_reports_the_targets(tmp_path):
    out = tmp_path / "ring.json"
    run_script("ring.py", "--quick", "--transports", "shardline,pyzmq", "--out", str(out))
    result = json.loads(out.read_text())
    assert result["targets"]["raw_cpp_one_way_p50_64B_us"] > 0
    assert out.with_suffix(".png").stat().st_size > 0


def test_kernel_resources_quick_check_passes(tmp_path):
    """Fails when a config the autotuner may choose spills registers or cannot launch on
    an H100, as compiled by this triton (no GPU needed, only its CUDA backend)."""
    triton = pytest.importorskip("triton")
    from shardline.kernels._compile import cuda_backend_available
    if not cuda_backend_available():
        pytest.skip("triton has no CUDA backend here")
    out = tmp_path / "kernel_resources.json"
    run_script("kernel_resources.py", "--quick", "--check", "--out", str(out))
    run = json.loads(out.read_text())[triton.__version__]
    compiled = {row["kernel"] for row in run["rows"]}
    assert {"_decode_split_kernel", "_merge_splits_kernel", "_prefill_kernel",
            "_write_kv_cache_kernel", "_matmul_kernel", "_matmul_partial_kernel",
            "_splitk_reduce_kernel", "_moe_gemm_kernel", "_moe_align_kernel",
            "_rms_norm_kernel", "_rotary_kernel"} <= compiled
    assert run["check_failures"] == []
    assert all(row["registers"] > 0 for row in run["rows"])

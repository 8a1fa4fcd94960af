"""bench/startup.py --count and bench/tune.py on the CPU: compiled kernels, launches
recorded or faked (no GPU here), in subprocesses without the interpreter (a tuned kernel
exists only for compiled Triton)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from shardline.kernels import _tuned

BENCH = Path(__file__).resolve().parents[2] / "bench"
COMPILED = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}


def run(*command: str) -> str:
    done = subprocess.run([sys.executable, *command], env=COMPILED, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


# tiny-llama: hidden 128, FFN 256, 4 heads of 32, 2 KV heads, vocab 320; K <= 256 never
# splits. The warm-up's token counts reach the 8 buckets 16..2048 for the four layer GEMMs;
# the logits' rows (1, 8, 16, 32, 64) reach 16, 32 and 64 for the LM head.
TINY_LLAMA_MATMUL_KEYS = 4 * 8 + 3
QKV_KEY = "M_BUCKET=16,N=256,K=128,SILU_MUL=False,dtype=float32"   # _matmul_kernel's key


@pytest.mark.timeout(600)
def test_count_reports_the_compiles_of_a_start(tmp_path):
    one_key = tmp_path / "table.json"
    _tuned.write_table(_tuned.TunedTable("NVIDIA Fake GPU", {"_matmul_kernel": {
        QKV_KEY: _tuned.config_from_json({"kwargs": {"BLOCK_M": 16, "BLOCK_N": 64,
                                                     "BLOCK_K": 128, "GROUP_M": 8},
                                          "num_warps": 4, "num_stages": 5}, "test"),
        "M_BUCKET=16,N=1,K=1,SILU_MUL=False,dtype=float32":
            _tuned.config_from_json({"kwargs": {}, "num_warps": 4, "num_stages": 1}, "test")}}),
        one_key)
    reports = {}
    for table in ("every", str(one_key)):
        out = tmp_path / f"count-{len(reports)}.json"
        printed = run(str(BENCH / "startup.py"), "--count", "--models", "tiny-llama",
                      "--table", table, "--out", str(out))
        assert "_matmul_kernel" in printed and "total" in printed
        [reports[table]] = json.loads(out.read_text())["models"]
    complete, partial = reports["every"], reports[str(one_key)]
    rows = {r["kernel"]: r for r in complete["kernels"]}
    assert rows["_matmul_kernel"]["keys"] == TINY_LLAMA_MATMUL_KEYS
    assert rows["_prefill_kernel"]["keys"] == 8 and rows["_decode_split_kernel"]["keys"] >= 1
    for r in complete["kernels"]:
        assert r["with_table"] == r["specializations"] >= max(1, r["keys"])
        assert r["autotuned"] >= r["with_table"]
    assert rows["_matmul_kernel"]["autotuned"] > 3 * rows["_matmul_kernel"]["with_table"]
    # Without a table the linears run torch.matmul: no GEMM compiles, one config per key of
    # the attention kernels, and the norms the GEMMs' epilogues no longer fold in.
    assert rows["_matmul_kernel"]["default"] == 0
    assert rows["_prefill_kernel"]["default"] == rows["_prefill_kernel"]["specializations"]
    assert rows["_rms_norm_kernel"]["default"] >= rows["_rms_norm_kernel"]["specializations"]
    for column in ("default", "autotuned", "with_table"):
        assert complete[f"total_{column}"] == sum(r[column] for r in rows.values())
    partial_rows = {r["kernel"]: r for r in partial["kernels"]}
    assert partial_rows["_matmul_kernel"]["table_hits"] == 1
    assert partial["total_autotuned"] == complete["total_autotuned"]
    assert partial["total_default"] == complete["total_default"]
    assert (complete["total_default"] < complete["total_with_table"]
            < partial["total_with_table"] < complete["total_autotuned"])


TUNE_SCRIPT = """
import json, os, sys, zlib
os.environ["SHARDLINE_FORCE_TRITON"] = "1"   # CPU tensors take the Triton path
from pathlib import Path
from unittest import mock
import torch, triton
sys.path.insert(0, sys.argv[1])
import tune
from shardline.kernels import _config, _tuned

out_dir, limit = Path(sys.argv[2]), sys.argv[3]
WINNERS = {"_matmul_kernel": "BLOCK_M=16 BLOCK_N=64 BLOCK_K=128 GROUP_M=8 TMA=False w4 s5",
           "_decode_split_kernel": "BLOCK_N=32 w2 s4",
           "_prefill_kernel": "BLOCK_M=32 BLOCK_N=32 w4 s2"}
LINEAR_COSTS = {"_rms_norm_kernel": 0.25, "_rotary_kv_cache_kernel": 0.125}
launched, ran, phase, keys_seen = [], [], ["kernels"], {}
real_launch, real_tune_kernels = _config.TunedKernel._launch, tune.tune_kernels

def spy(kernel, args, grid, warmup, kwargs, config):
    launched.append((kernel.name, config, kwargs))
    return real_launch(kernel, args, grid, warmup, kwargs, config)

def fake_ms(fn, warmup_ms, rep_ms):
    launched.clear()
    ran.clear()
    fn()
    if phase[0] == "linear":   # torch.matmul or Triton's GEMM, then the op's other kernels
        gemm = 2.0 if launched and launched[-1][2]["SILU_MUL"] else 0.5 if launched else 1.0
        return gemm + sum(LINEAR_COSTS.get(name, 0.0) for name in ran)
    name, config, _ = launched[-1]
    described = tune.describe(config)
    if WINNERS.get(name) == described:
        return 0.5
    return 1.0 + zlib.crc32(described.encode()) % 97 / 100   # the others, in no order

def counting(launches, *args):
    for launch in launches:
        keys_seen[launch.kernel.name] = keys_seen.get(launch.kernel.name, 0) + 1
    return real_tune_kernels(launches, *args)

no_run = lambda fn, *args, grid, warmup, **kwargs: ran.append(fn.fn.__name__)
with mock.patch.object(triton.runtime.JITFunction, "run", no_run), \\
        mock.patch.object(_config.TunedKernel, "_launch", spy), \\
        mock.patch.object(tune, "median_ms", fake_ms), \\
        mock.patch.object(tune, "tune_kernels", counting):
    sys.argv = ["tune.py", "--models", "tiny-llama", "--out-dir", str(out_dir)] + (
        ["--time-limit", limit] if limit != "none" else [])
    path = tune.tune(tune.parse_args(), torch.device("cpu"), "NVIDIA Fake GPU")
    table = _tuned.read_table(path)
    shapes = [(1, 96, 64, torch.float32, "linear", None),
              (5, 96, 64, torch.float32, "linear", None),
              (3, 64, 64, torch.float32, "silu_mul", None),
              (4, 64, 64, torch.float32, "rms_norm", None),
              (2, 96, 64, torch.float32, "qkv_rotary", (1, 1, 32))]
    phase[0] = "linear"
    if limit == "none":
        tune.tune_linear(table, shapes, torch.device("cpu"), tune.Deadline(None), 1, 1)
print(json.dumps({"path": str(path), "winners": WINNERS,
                  "kernels": {name: {key: tune.describe(c) for key, c in entries.items()}
                              for name, entries in table.kernels.items()},
                  "reached": keys_seen,
                  "linear": table.linear}))
"""


@pytest.mark.timeout(600)
def test_tune_writes_the_fastest_config_of_every_key(tmp_path):
    result = json.loads(run("-c", TUNE_SCRIPT, str(BENCH), str(tmp_path), "none")
                        .splitlines()[-1])
    assert Path(result["path"]) == tmp_path / "nvidia-fake-gpu.json"
    kernels = result["kernels"]
    assert set(kernels) == set(result["winners"])
    assert len(kernels["_matmul_kernel"]) == TINY_LLAMA_MATMUL_KEYS
    for name, entries in kernels.items():
        assert len(entries) == result["reached"][name]
        assert set(entries.values()) == {result["winners"][name]}, name
    # Each op's Triton form (its GEMM's kernels, the fused ones) against its torch.matmul
    # form (the op's own kernel after torch.matmul), two Ms summed for the plain linear; the
    # same weight shape feeding another op is another key.
    timed = {key.split(",OP=")[1].split(",")[0]: (entry["triton_ms"], entry["torch_ms"],
                                                    entry["backend"])
             for key, entry in result["linear"].items()}
    assert timed == {"linear": (1.0, 2.0, "triton"), "silu_mul": (2.0, 1.0, "torch"),
                     "rms_norm": (0.75, 1.25, "triton"),
                     "qkv_rotary": (0.625, 1.125, "triton")}
    assert set(result["linear"]) == {
        "M_BUCKET=16,N=96,K=64,OP=linear,dtype=float32",
        "M_BUCKET=16,N=64,K=64,OP=silu_mul,dtype=float32",
        "M_BUCKET=16,N=64,K=64,OP=rms_norm,dtype=float32",
        "M_BUCKET=16,N=96,K=64,OP=qkv_rotary,dtype=float32"}


@pytest.mark.timeout(600)
def test_tune_stops_at_its_time_limit(tmp_path):
    result = json.loads(run("-c", TUNE_SCRIPT, str(BENCH), str(tmp_path), "0")
                        .splitlines()[-1])
    assert result["kernels"] == {} and result["linear"] == {}
    assert sum(result["reached"].values()) > 0


@pytest.mark.timeout(600)
def test_startup_times_each_case_in_a_fresh_process(tmp_path):
    out = tmp_path / "startup.json"
    run(str(BENCH / "startup.py"), "--device", "cpu", "--models", "tiny-llama",
        "--runs", "1", "--timeout", "300", "--out", str(out))
    result = json.loads(out.read_text())
    assert result["device"] == "CPU" and result["targets_s"] == {
        "first": 20.0, "restart": 10.0, "eager": 10.0}
    rows = result["results"]
    assert [(r["model"], r["case"]) for r in rows] == [
        ("tiny-llama", case) for case in ("first", "restart", "eager")]
    for r in rows:
        assert not r["timed_out"] and "error" not in r, r
        assert 0 < r["ready_s"] < r["process_s"] and r["first_request_s"] > 0
        assert r["met"] == (r["ready_s"] <= r["target_s"])
        # Where a start spent its time: the engine's own log, timed from the child's start.
        [run_] = r["runs"]
        times = [seconds for seconds, _ in run_["timeline"]]
        assert times == sorted(times) and 0 < times[-1] <= run_["import_s"] + run_["ready_s"]
        assert any(message.startswith("KV cache: ") for _, message in run_["timeline"])


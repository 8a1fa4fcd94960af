"""The benchmark scripts run end to end in their CPU smoke modes and write their results.

Their numbers are meaningless here; what is checked is that every code path still runs
and that the JSON holds what the closing notes are read from: one row per case the
script plans, positive times, and derived numbers (medians, ratios, rooflines) that agree
with the raw ones they come from.
"""

import ast
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"


def run_script(name: str, *args: str, env: dict[str, str] | None = None) -> None:
    done = subprocess.run([sys.executable, str(BENCH / name), *args], capture_output=True,
                          text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]


def assert_percentiles(p: dict) -> None:
    assert set(p) == {"p50", "p90", "p99", "mean"}
    assert 0 < p["p50"] <= p["p90"] <= p["p99"] and p["mean"] > 0


def test_throughput_quick_agrees_with_transformers(tmp_path):
    out = tmp_path / "throughput.json"
    run_script("throughput.py", "--quick", "--model", "tiny-llama", "--out", str(out))
    result = json.loads(out.read_text())
    assert result["greedy_agreement_first8"] == 1.0
    assert (result["num_prompts"], result["repeats"]) == (16, 1)
    low, high = result["output_len_range"]
    assert 16 * low <= result["total_output_tokens"] <= 16 * high
    ours = result["shardline"]
    assert ours["output_tokens"] == result["total_output_tokens"]
    assert ours["elapsed_s"] > 0
    assert ours["output_tokens_per_s"] == pytest.approx(ours["output_tokens"] / ours["elapsed_s"])
    assert_percentiles(ours["ttft_s"])
    assert_percentiles(ours["tpot_s"])
    assert ours["ttft_s"]["p99"] <= ours["elapsed_s"]
    assert result["shardline_tokens_per_s_runs"] == [ours["output_tokens_per_s"]]
    theirs = result["transformers"]
    assert len(theirs["runs"]) == 1 and all(r > 0 for r in theirs["runs"])
    assert theirs["output_tokens_per_s"] == statistics.median_high(theirs["runs"])
    assert ours["output_tokens_per_s"] == statistics.median_high(
        result["shardline_tokens_per_s_runs"])
    assert result["speedup"] == pytest.approx(
        ours["output_tokens_per_s"] / theirs["output_tokens_per_s"])
    assert out.with_suffix(".png").stat().st_size > 0


def test_e2e_decode_tiny_runs_on_cpu(tmp_path):
    run_script("e2e_decode.py", "--tiny", "--device", "cpu", "--out-dir", str(tmp_path))
    result = json.loads((tmp_path / "e2e_decode.json").read_text())
    plan, rows = result["plan"], result["results"]
    assert result["device"] == "CPU" and result["tiny"] is True
    assert [r["batch"] for r in rows] == plan["batches"] == [1, 2, 4]
    bandwidth = result["copy_bandwidth_GBps"] * 1e9
    assert bandwidth > 0 and result["weight_bytes"] > 0
    for r in rows:
        assert len(r["tokens_per_s_runs"]) == plan["runs"]
        assert all(rate > 0 for rate in r["tokens_per_s_runs"])
        assert r["tokens_per_s"] == pytest.approx(statistics.median(r["tokens_per_s_runs"]))
        assert r["step_ms"] == pytest.approx(r["batch"] / r["tokens_per_s"] * 1e3)
        assert r["bytes_per_step"] >= result["weight_bytes"]
        assert r["roofline_tokens_per_s"] == pytest.approx(
            r["batch"] * bandwidth / r["bytes_per_step"])
        assert r["fraction_of_roofline"] == pytest.approx(
            r["tokens_per_s"] / r["roofline_tokens_per_s"])
        assert r["graph_step_ms"] is None and r["graph_fraction_of_roofline"] is None
    assert [r["bytes_per_step"] for r in rows] == sorted(r["bytes_per_step"] for r in rows)
    assert [(t["batch"], t["fraction"], t["met"]) for t in result["targets"]] == [
        (rows[0]["batch"], 0.7, None), (rows[-1]["batch"], 0.6, None)]   # judged on a GPU
    assert result["async_scheduling"] is True
    assert (tmp_path / "e2e_decode.png").stat().st_size > 0


def test_cpu_attention_quick_compares_every_path(tmp_path):
    """With --baseline (here a copy of the installed build) each call also runs on it."""
    import shardline._cpu_kernels
    baseline = tmp_path / Path(shardline._cpu_kernels.__file__).name
    shutil.copy(shardline._cpu_kernels.__file__, baseline)
    out = tmp_path / "cpu_attention.json"
    run_script("cpu_attention.py", "--quick", "--out", str(out), "--baseline", str(baseline))
    result = json.loads(out.read_text())
    assert result["copy_gb_per_s"] > 0 and len(result["per_call"]) == 4
    for row in result["per_call"]:
        assert min(row["cpp_ms"], row["cpp_4k_pages_ms"], row["reference_ms"],
                   row["baseline_ms"]) > 0
        assert math.isclose(row["speedup"], row["reference_ms"] / row["cpp_ms"])
        assert math.isclose(row["cpp_gb_per_s"], row["kv_bytes"] / row["cpp_ms"] / 1e6)
        assert math.isclose(row["huge_pages_speedup"], row["cpp_4k_pages_ms"] / row["cpp_ms"])
        assert math.isclose(row["speedup_over_baseline"], row["baseline_ms"] / row["cpp_ms"])
    e2e = result["end_to_end"]
    assert set(e2e["runs"]) == {"cpp", "reference", "baseline"}
    for path, runs in e2e["runs"].items():
        assert len(runs) == e2e["rounds"] and e2e["median_tokens_per_s"][path] == \
            statistics.median(runs) > 0
    medians = e2e["median_tokens_per_s"]
    assert math.isclose(e2e["speedup"], medians["cpp"] / medians["reference"])
    assert math.isclose(e2e["speedup_over_baseline"], medians["cpp"] / medians["baseline"])


def test_cpu_attention_baseline_build_is_its_own_module(tmp_path, monkeypatch):
    """A second build loaded under the installed one's name would be the installed module
    again (CPython keeps one per name), and every A/B would compare a build with itself."""
    import shardline._cpu_kernels
    from shardline.kernels import cpu_attention
    monkeypatch.syspath_prepend(str(BENCH))
    bench = __import__("cpu_attention")
    copy = tmp_path / Path(shardline._cpu_kernels.__file__).name
    shutil.copy(shardline._cpu_kernels.__file__, copy)
    build = bench.load_build(str(copy))
    assert build is not shardline._cpu_kernels
    assert build.paged_decode_attention is not shardline._cpu_kernels.paged_decode_attention
    seen = []
    assert bench.on_build(build, lambda: seen.append(cpu_attention._cpu_kernels) or 7)() == 7
    assert seen == [build] and cpu_attention._cpu_kernels is shardline._cpu_kernels
    cache = torch.randn(5, 16, 2, 64).to(torch.bfloat16)
    copy = bench.on_small_pages(cache)
    assert torch.equal(copy, cache) and copy.data_ptr() != cache.data_ptr()


def test_async_scheduling_quick_compares_both_modes(tmp_path):
    run_script("async_scheduling.py", "--quick", "--out-dir", str(tmp_path))
    result = json.loads((tmp_path / "async_scheduling.json").read_text())
    assert result["executor"] == "mp" and result["runs"] == 2
    assert [r["batch"] for r in result["results"]] == [1, 16]
    for row in result["results"]:
        for mode in ("in order", "async"):
            runs = row[mode]["runs"]
            assert len(runs) == 2 and all(rate > 0 for rate in runs)
            assert row[mode]["tokens_per_s"] == pytest.approx(statistics.median(runs), abs=0.1)
        assert row["async_over_in_order"] == pytest.approx(
            row["async"]["tokens_per_s"] / row["in order"]["tokens_per_s"])
    assert (tmp_path / "async_scheduling.png").stat().st_size > 0


# Cases of the dry run, each at TP 1, 2 and 8: 4 GEMMs of a Llama layer at M = 4, 16 (small)
# and 64; one decode, one prefill and one MoE shape.
KERNEL_CASES = {"matmul M<=16": 3 * 4 * 2, "matmul M>=512": 3 * 4 * 1, "decode attention": 3,
                "prefill attention": 3, "fused moe": 3}


# torch 2.13 runs torch._grouped_mm on the CPU (the dry run's device); older ones may not.
GROUPED_MM_ON_CPU = tuple(map(int, torch.__version__.split("+")[0].split(".")[:2])) >= (2, 13)


@pytest.mark.timeout(600)
def test_kernels_dry_run_covers_every_kernel(tmp_path):
    run_script("kernels.py", "--dry-run", "--out-dir", str(tmp_path))
    result = json.loads((tmp_path / "kernels.json").read_text())
    assert result["dry_run"] is True and set(result["targets"]) == set(KERNEL_CASES)
    assert result["ceilings"]["copy_GBps"] > 0 and result["ceilings"]["matmul_TFLOPs"] > 0
    rows: dict[str, list[dict]] = {}
    for r in result["results"]:
        rows.setdefault(r["bench"], []).append(r)
    assert {bench: len(found) for bench, found in rows.items()} == KERNEL_CASES
    for r in result["results"]:
        assert r["ms"] > 0 and math.isfinite(r["ms"])
        assert r["target"] == result["targets"][r["bench"]] and r["passed"] is None
        assert 0 <= r["rel_err"] < 1e-2, r
        if r["bench"] == "decode attention":
            assert r["baseline_ms"] is None
            assert r["value"] == pytest.approx(r["extra"]["GBps"]
                                               / result["ceilings"]["copy_GBps"])
        else:
            assert r["baseline_ms"] > 0
            assert r["value"] == pytest.approx(r["baseline_ms"] / r["ms"])
        if r["bench"] == "fused moe" and ("x_grouped_mm" in r["extra"] or GROUPED_MM_ON_CPU):
            grouped = r["extra"]
            assert grouped["x_grouped_mm"] == pytest.approx(grouped["grouped_mm_ms"] / r["ms"])
            assert 0 <= grouped["grouped_mm_rel_err"] < 1e-2, r
    assert len({r["case"] for r in result["results"]}) == len(result["results"])
    assert (tmp_path / "kernels.png").stat().st_size > 0


def test_timer_keeps_the_output_of_the_last_run_on_the_first_input_set(monkeypatch, rng):
    """The dry runs check that output instead of running the call again."""
    monkeypatch.syspath_prepend(str(BENCH))
    from _timing import Timer
    copies, reps = rng.randint(1, 4), rng.randint(1, 9)
    calls = []
    timer = Timer(torch.device("cpu"), rng.randint(0, 2), reps)
    assert timer(lambda i: calls.append(i) or (len(calls), i), copies) >= 0
    last = max(n for n, i in enumerate(calls, 1) if i == 0 and n > len(calls) - reps)
    assert timer.last_output == (last, 0)


def test_decode_splits_dry_run_sweeps_every_split_count_of_every_case(tmp_path):
    run_script("decode_splits.py", "--dry-run", "--out-dir", str(tmp_path))
    result = json.loads((tmp_path / "decode_splits.json").read_text())
    assert result["dry_run"] is True and result["copy_GBps"] > 0
    # TINY's one decode shape (2 sequences of 40 tokens in 16-token blocks: 48 tokens a
    # table, split into 16-token multiples) at each TP size.
    assert [(r["tp"], r["batch"], r["context"]) for r in result["cases"]] == [
        (1, 2, 40), (2, 2, 40), (8, 2, 40)]
    for r in result["cases"]:
        assert list(r["fractions"]) == ["1", "2"] and r["max_rel_err"] < 1e-3, r
        pairs = {(int(s), c): f for s, row in r["fractions"].items() for c, f in row.items()}
        assert all(f > 0 and math.isfinite(f) for f in pairs.values())
        best = r["best"]
        assert pairs[best["splits"], best["config"]] == best["fraction"] == max(pairs.values())
        heuristic = r["heuristic"]
        assert heuristic["splits"] == 1      # 48 tokens: choose_splits' 256-token floor
        assert heuristic["fraction"] == max(r["fractions"]["1"].values())


def test_host_overhead_quick_accounts_for_every_step(tmp_path):
    run_script("host_overhead.py", "--quick", "--out-dir", str(tmp_path))
    result = json.loads((tmp_path / "host_overhead.json").read_text())
    assert (result["steps"], result["runs"]) == (40, 2)
    assert {(r["mode"], r["batch"]) for r in result["results"]} == {
        ("greedy", 1), ("greedy", 16), ("sampled", 1), ("sampled", 16)}
    for row in result["results"]:
        assert 0 < row["host_us"] < row["step_us"]
        assert len(row["host_us_runs"]) == result["runs"]
        assert row["host_us"] == pytest.approx(statistics.median_low(row["host_us_runs"]),
                                               abs=0.1)
        assert row["host_us_per_request"] == pytest.approx(row["host_us"] / row["batch"])
        assert sum(row["parts_us"].values()) == pytest.approx(row["host_us"])
        assert {"schedule", "build step inputs", "sampler"} <= set(row["parts_us"])
        assert all(row["parts_us"][part] > 0 for part in ("schedule", "build step inputs"))
    assert (tmp_path / "host_overhead.png").stat().st_size > 0


RING_READERS = (1, 3)
RING_PAYLOADS = [("bytes", 64), ("array", 64), ("array", 4096), ("array", 64 << 10),
                 ("array", 1 << 20)]


def test_ring_quick_reports_the_targets(tmp_path):
    out = tmp_path / "ring.json"
    run_script("ring.py", "--quick", "--transports", "shardline,pyzmq", "--out", str(out))
    result = json.loads(out.read_text())
    rows = {(r["transport"], r["n_readers"], r["payload_type"], r["payload_bytes"]): r
            for r in result["results"]}
    assert len(rows) == len(result["results"])
    assert set(rows) == {(transport, readers, kind, size) for transport in ("shardline", "pyzmq")
                         for readers in RING_READERS for kind, size in RING_PAYLOADS}
    for (_, _, _, size), r in rows.items():
        assert 0 < r["one_way_p50_us"] <= r["one_way_p99_us"]
        assert 0 < r["round_trip_p50_us"] <= r["round_trip_p99_us"]
        assert r["one_way_p50_us"] <= r["round_trip_p50_us"]   # each reader sees it first
        assert r["msgs_per_s"] > 0
        assert r["gb_per_s"] == pytest.approx(r["msgs_per_s"] * size / 1e9)
    raw = result["raw_cpp_one_way"]
    assert [r["payload_bytes"] for r in raw] == [size for kind, size in RING_PAYLOADS[1:]]
    assert all(0 < r["one_way_p50_us"] <= r["one_way_p99_us"] for r in raw)
    assert set(result["idle_reader_cpu_percent"]) == {"shardline", "pyzmq"}
    assert all(value >= 0 for value in result["idle_reader_cpu_percent"].values())

    targets = result["targets"]
    for readers in RING_READERS:
        for kind in ("bytes", "array"):
            ratio = targets[f"pyzmq_over_shardline_round_trip_p50_64B_{kind}_{readers}_readers"]
            assert ratio == pytest.approx(rows["pyzmq", readers, kind, 64]["round_trip_p50_us"]
                                          / rows["shardline", readers, kind, 64]
                                          ["round_trip_p50_us"])
    assert targets["raw_cpp_one_way_p50_64B_us"] == raw[0]["one_way_p50_us"]
    assert (targets["idle_reader_cpu_percent_of_a_core"]
            == result["idle_reader_cpu_percent"]["shardline"])
    assert out.with_suffix(".png").stat().st_size > 0


@pytest.mark.timeout(600)
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
            "_rms_norm_kernel", "_rotary_kernel", "_rotary_kv_cache_kernel"} <= compiled
    assert run["check_failures"] == []
    assert all(row["registers"] > 0 for row in run["rows"])


def test_gpu_mp_check_smoke_runs_on_cpu(tmp_path):
    run_script("gpu_mp_check.py", "--device", "cpu", "--model", "tiny-llama",
               "--out-dir", str(tmp_path))
    result = json.loads((tmp_path / "gpu_mp_check.json").read_text())
    assert result["device"] == "CPU" and result["requests"] == 16
    assert result["share_of_requests_equal"] == 1.0   # fp32: the same tokens either way
    assert result["uni_wall_s"] > 0 and result["mp_wall_s"] > 0
    collectives = result["collectives_at_world_size_1"]
    assert collectives.pop("backend") == "gloo" and len(collectives) == 10
    assert all(ok is True for ok in collectives.values()), collectives


def test_sequence_parallel_quick_matches_one_rank(tmp_path):
    run_script("sequence_parallel.py", "--quick", "--layouts", "uni,sp2", "--out-dir",
               str(tmp_path))
    result = json.loads((tmp_path / "sequence_parallel.json").read_text())
    rows = {row["layout"]: row for row in result["rows"]}
    assert set(rows) == {"uni", "sp2"} and result["prompt_len"] == 96
    assert all(row["token_matches_first_layout"] and row["prefill_s"] > 0
               for row in rows.values())
    assert rows["uni"]["bytes_per_prompt_token_per_rank"] == [0]
    assert len(rows["sp2"]["bytes_per_prompt_token_per_rank"]) == 2
    assert min(rows["sp2"]["bytes_per_prompt_token_per_rank"]) > 0


def test_launches_counts_one_decode_step(tmp_path):
    """Per layer one fused rotary + KV-cache write (never the two kernels it replaced), one
    decode attention, two norms (plus the first layer's input norm), each a launch of its
    own or fused into a split-K reduction (only at batch 1 here, where the down projection
    splits); every launch counted once."""
    out = tmp_path / "launches.json"
    run_script("launches.py", "--model", "small-llama", "--batch", "1", "64", "--out", str(out))
    rows = json.loads(out.read_text())["rows"]
    assert [r["batch"] for r in rows] == [1, 64]
    for r in rows:
        layers, kernels = r["layers"], r["kernels"]
        assert kernels["_rotary_kv_cache_kernel"] == kernels["_decode_split_kernel"] == layers
        assert "_rotary_kernel" not in kernels and "_write_kv_cache_kernel" not in kernels
        assert kernels["_rms_norm_kernel"] + r["norms_fused"] == 2 * layers + 1
        assert r["norms_fused"] == (layers if r["batch"] == 1 else 0)
        gemms = kernels.get("_matmul_kernel", 0) + kernels.get("_matmul_partial_kernel", 0)
        assert gemms == 4 * layers
        assert r["launches"] == sum(kernels.values())
        assert r["per_layer"] == pytest.approx(r["launches"] / layers)


def test_bench_docstrings_keep_every_line_of_their_source():
    """A backslash ending a line of a non-raw docstring joins it to the next (it did to
    async_scheduling.py's chunked-prefill example): each bench module's docstring has as
    many lines as its source shows."""
    for path in sorted(BENCH.glob("*.py")):
        source = path.read_text()
        first = ast.parse(source).body[0]
        if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
            literal = ast.get_source_segment(source, first.value)
            assert literal.count("\n") == first.value.value.count("\n"), path.name


def test_bench_checkpoints_drawn_on_another_device_are_kept_apart(tmp_path, monkeypatch):
    """The CPU's and CUDA's generators draw different weights from one seed, so a
    checkpoint written on one is not the other's."""
    monkeypatch.syspath_prepend(str(BENCH))
    monkeypatch.setenv("SHARDLINE_CACHE", str(tmp_path))
    import _models
    cpu_dir = _models.checkpoint_dir(_models.TINY, torch.float32, torch.device("cpu"))
    drawn_on = []
    monkeypatch.setattr(_models, "write_checkpoint",
                        lambda shape, dtype, device, out: drawn_on.append(device))
    cuda = torch.device("cuda", 0)
    assert _models.checkpoint_dir(_models.TINY, torch.float32, cuda) != cpu_dir
    assert drawn_on == [cuda]
    assert _models.checkpoint_dir(_models.TINY, torch.float32, torch.device("cpu")) == cpu_dir
    assert (_models.checkpoint_path(_models.TINY, torch.float32, torch.device("cuda", 1))
            == _models.checkpoint_path(_models.TINY, torch.float32, cuda))


@pytest.mark.timeout(600)
def test_startup_count_without_a_table_under_the_interpreter(tmp_path):
    """--count records launches instead of running them even where TRITON_INTERPRET=1 is
    set (the interpreter would run the whole warm-up), and --table none counts no table,
    as it means when timing starts."""
    out = tmp_path / "count.json"
    run_script("startup.py", "--count", "--models", "tiny-llama", "--table", "none",
               "--out", str(out), env=dict(os.environ, TRITON_INTERPRET="1"))
    [report] = json.loads(out.read_text())["models"]
    assert report["table"] == "none"
    rows = {r["kernel"]: r for r in report["kernels"]}
    assert rows["_matmul_kernel"]["autotuned"] > rows["_matmul_kernel"]["specializations"]
    assert all(r["with_table"] == r["autotuned"] and r["table_hits"] == 0
               for r in rows.values())
    assert report["total_with_table"] == report["total_autotuned"] > report["total_default"]


@pytest.mark.timeout(600)
def test_startup_reports_the_median_of_its_runs(tmp_path):
    out = tmp_path / "startup.json"
    run_script("startup.py", "--device", "cpu", "--models", "tiny-llama", "--cases", "first",
               "--runs", "2", "--timeout", "300", "--out", str(out))
    result = json.loads(out.read_text())
    assert result["runs"] == 2
    [row] = result["results"]
    assert (row["model"], row["case"], len(row["runs"])) == ("tiny-llama", "first", 2)
    for name in ("import_s", "ready_s", "first_request_s", "process_s"):
        assert all(run[name] > 0 for run in row["runs"])
        assert row[name] == pytest.approx(statistics.median(run[name] for run in row["runs"]))
    assert row["met"] == (row["ready_s"] <= row["target_s"])


def test_startup_cut_off_keeps_the_models_it_finished(tmp_path):
    """The GPU check's startup stage may hit its time limit: what it measured must be on
    disk by then (it wrote its JSON only at the end)."""
    out = tmp_path / "startup.json"
    child = subprocess.Popen(
        [sys.executable, str(BENCH / "startup.py"), "--device", "cpu", "--models", "tiny-llama",
         "tiny-qwen2", "--cases", "first", "--runs", "1", "--timeout", "300", "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        for line in child.stdout:
            if line.startswith("wrote "):
                break
    finally:
        child.kill()
        child.wait()
    [row] = json.loads(out.read_text())["results"]
    assert (row["model"], row["case"], len(row["runs"])) == ("tiny-llama", "first", 1)
    assert row["ready_s"] > 0


def test_omp_wait_policy_runs_every_variant(tmp_path):
    """One load, beside a busy process (the idle machine is the same code with none): each
    variant is a fresh process, so a second load would only double the starts."""
    run_script("omp_wait_policy.py", "--busy", "1", "--rounds", "1", "--model", "tiny-llama",
               "--max-tokens", "4", "--workloads", "demo", "--out-dir", str(tmp_path))
    result = json.loads((tmp_path / "omp_wait_policy.json").read_text())
    assert [load["busy_processes"] for load in result["loads"]] == [1]
    for load in result["loads"]:
        medians = load["median_tokens_per_s"]
        assert set(medians) == {"spinning", "short spin", "sleeping", "one thread"}
        for name, runs in load["runs_tokens_per_s"].items():
            assert len(runs) == 1 and medians[name] == statistics.median(runs) > 0
            assert math.isclose(load["ratio_to_spinning"][name],
                                medians[name] / medians["spinning"])

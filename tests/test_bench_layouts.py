"""bench/layouts.py and bench/load_memory.py run end to end in their quick modes.

Their timings mean nothing here; what is checked is that every layout serves the workload
with the same greedy tokens as one rank, that the JSON holds one consistent row per layout,
and that the ranks' communication counters and load reports are where the layout puts them.
"""

import json
import multiprocessing
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
LAYOUTS = {"uni": (1, 1, 1), "tp2": (2, 1, 1), "pp2": (1, 2, 1), "tp2xpp2": (2, 2, 1),
           "tp4": (4, 1, 1), "dp2": (1, 1, 2), "dp2xtp2": (2, 1, 2)}  # TP, PP, DP


def run_script(name: str, *args: str) -> None:
    done = subprocess.run([sys.executable, str(BENCH / name), *args], capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]


@pytest.mark.timeout(900)
def test_layouts_quick_same_tokens_and_traffic_where_the_layout_puts_it(tmp_path):
    run_script("layouts.py", "--quick", "--out-dir", str(tmp_path))
    result = json.loads((tmp_path / "layouts.json").read_text())
    assert (result["model"], result["rounds"], result["reference_layout"]) == \
        ("tiny-llama", 1, "uni")
    rows = {r["layout"]: r for r in result["results"]}
    assert list(rows) == list(LAYOUTS)
    generated = result["num_prompts"] * result["max_tokens"]
    assert result["forwarded_tokens"] == \
        result["num_prompts"] * (result["prompt_len"] + result["max_tokens"] - 1)
    assert len({r["tokens_sha256"] for r in rows.values()}) == 1
    for name, r in rows.items():
        tp, pp, dp = LAYOUTS[name]
        assert (r["tp"], r["pp"], r["dp"], r["ranks"]) == (tp, pp, dp, tp * pp * dp)
        assert r["tokens_match_reference"] and r["output_tokens"] == generated
        assert len(r["tokens_per_s_runs"]) == len(r["step_ms_runs"]) == result["rounds"]
        assert r["tokens_per_s"] == pytest.approx(statistics.median(r["tokens_per_s_runs"]))
        assert r["tokens_per_s"] > 0 and 0 < r["step_ms"] and r["steps"] >= result["max_tokens"]
        assert r["startup_s"] > 0 and r["comm_bytes_identical_across_runs"]
        ranks = r["bytes_per_token_per_rank"]
        assert [x["rank"] for x in ranks] == list(range(tp * pp * dp))
        for x in ranks:
            assert x["bytes_per_token"] == pytest.approx(sum(x["by_op_per_token"].values()))
            assert x["bytes_per_forwarded_token"] == pytest.approx(
                x["bytes_per_token"] * generated / result["forwarded_tokens"])
            ops = {op.rpartition("/")[2] for op in x["by_op_per_token"]}
            stage = x["rank"] // tp % pp
            # TP ranks all-reduce; a stage before the last sends its activations on.
            assert ("all_reduce" in ops) == (tp > 1)
            assert ("send" in ops) == (stage < pp - 1)
            assert (x["bytes_per_token"] > 0) == (tp > 1 or stage < pp - 1)
        # Every rank of a stage of a core sends the same bytes (the same collectives).
        for first in range(0, tp * pp * dp, tp):
            same_stage = {x["bytes_per_token"] for x in ranks[first:first + tp]}
            assert len(same_stage) == 1
        assert r["max_rank_bytes_per_token"] == max(x["bytes_per_token"] for x in ranks)
    assert rows["uni"]["max_rank_bytes_per_token"] == 0
    assert (tmp_path / "layouts.png").stat().st_size > 0


@pytest.mark.timeout(900)
def test_load_memory_quick_reports_every_rank(tmp_path):
    run_script("load_memory.py", "--quick", "--out-dir", str(tmp_path))
    result = json.loads((tmp_path / "load_memory.json").read_text())
    assert result["model"] == "tiny-llama" and result["checkpoint_bytes"] > 0
    by_tp = {layout["tp"]: layout for layout in result["results"]}
    assert sorted(by_tp) == [1, 4]
    for tp, layout in by_tp.items():
        assert [r["rank"] for r in layout["ranks"]] == list(range(tp))
        for r in layout["ranks"]:
            assert r["peak_rss_bytes"] >= r["start_rss_bytes"] > 0 and r["load_s"] > 0
            assert r["peak_over_start_bytes"] == pytest.approx(
                statistics.median(r["peak_over_start_runs"]))
            assert r["peak_over_weights"] == pytest.approx(
                r["peak_over_start_bytes"] / r["weight_bytes"])
    whole = by_tp[1]["ranks"][0]["weight_bytes"]
    assert whole == pytest.approx(result["checkpoint_bytes"], rel=0.01)
    quarters = [r["weight_bytes"] for r in by_tp[4]["ranks"]]
    # A quarter of every split weight each; the norms (and KV heads beyond the model's
    # two) are held by every rank, so the sum is a little over the whole.
    assert len(set(quarters)) == 1 and whole <= sum(quarters) < 1.5 * whole


def report_peak_over_start(results) -> None:
    """In a spawned process: what load_memory's worker would measure for a load that
    allocates nothing."""
    import load_memory

    load_memory.reset_peak_rss()
    start = load_memory.current_rss_bytes()
    results.put(load_memory.peak_rss_bytes() - start)


def test_load_memory_measures_the_workers_own_peak_not_its_parents(monkeypatch, rng):
    """A worker spawned by a large engine process reports what it added itself: the
    peak over start of a load that allocates nothing stays near zero while the parent
    holds 768-1024 MiB, more than a worker that imported torch (getrusage's ru_maxrss
    began at the parent's size)."""
    monkeypatch.syspath_prepend(str(BENCH))
    held = bytearray(rng.randint(768, 1024) << 20)
    held[::4096] = b"\x01" * len(held[::4096])  # resident, page by page
    spawn = multiprocessing.get_context("spawn")
    results = spawn.Queue()
    child = spawn.Process(target=report_peak_over_start, args=(results,))
    child.start()
    try:
        added = results.get(timeout=120)
    finally:
        child.join(30)
    assert added < 32 << 20, f"peak over start {added / 2**20:.0f} MiB for an empty load"

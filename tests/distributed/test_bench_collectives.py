"""bench/collectives.py runs end to end in its quick mode and writes what bench/README.md
is read from. Its numbers are meaningless on a shared CI machine; their shape is checked."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.mark.timeout(600)
def test_collectives_quick_reports_every_op_size_and_world(tmp_path):
    out = tmp_path / "collectives.json"
    done = subprocess.run([sys.executable, str(BENCH / "collectives.py"), "--quick", "--out",
                           str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    report = json.loads(out.read_text())
    sizes = report["settings"]["sizes"]
    expected = {(op, world, size, backend) for op in ("all_reduce", "all_gather")
                for world in (2, 4) for size in sizes for backend in ("shm", "gloo")}
    rows = {(r["op"], r["world"], r["bytes_per_rank"], r["backend"]): r for r in report["results"]}
    assert set(rows) == expected
    for row in rows.values():
        assert len(row["us_repeats"]) == report["settings"]["repeats"]
        assert all(us > 0 for us in row["us_repeats"]) and row["us_median"] > 0
    assert len(report["speedups"]) == len(expected) // 2
    assert all(r["speedup"] > 0 for r in report["speedups"])
    for key in ("all_reduce_2_ranks_min_speedup", "all_reduce_4_ranks_min_speedup",
                "all_gather_2_ranks_min_speedup", "all_gather_4_ranks_min_speedup"):
        assert report["targets"][key] > 0
    for op in ("all_reduce", "all_gather"):
        worst = min(report["targets"][f"{op}_{w}_ranks_min_speedup"] for w in (2, 4))
        assert report["targets"][f"{op}_target_met"] == (worst >= 5.0)
    assert out.with_suffix(".png").stat().st_size > 0

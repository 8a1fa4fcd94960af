"""Launching a world of ranks for the multi-process tests of tests/distributed."""

from __future__ import annotations

import os
import queue

import pytest
from dist_workers import TIMEOUT, run_rank
from launcher import SPAWN, join_all, spawn

from shardline.distributed.grid import RankGrid


def shm_leftovers(names: list[str]) -> list[str]:
    """Those of `names` (segment names such as /shardline-...) still in /dev/shm."""
    return [name for name in names if os.path.exists("/dev/shm" + name)]


@pytest.fixture
def run_world(tmp_path):
    """run_world(grid, check, *args, shm=True, shm_buffer_bytes=..., prepare=None) spawns
    one process per rank of `grid`, each running dist_workers.<prepare>(rank) if given,
    joining the grid and running dist_workers.<check>(rank, *args);
    returns every rank's value in rank order, or fails with the tracebacks of the ranks
    that raised. Never hangs: results are awaited for TIMEOUT seconds, then all killed."""
    runs = iter(range(1_000_000))

    def run(grid: RankGrid, check: str, *args: object, shm: bool = True,
            shm_buffer_bytes: int = 1 << 20, prepare: str | None = None) -> list[object]:
        init_method = f"file://{tmp_path}/store-{next(runs)}"
        results = SPAWN.Queue()
        procs = [spawn(run_rank, rank, grid, init_method, check, args, results, shm,
                       shm_buffer_bytes, prepare) for rank in range(grid.world_size)]
        reports = {}
        try:
            for _ in procs:
                rank, status, value = results.get(timeout=2 * TIMEOUT)
                reports[rank] = (status, value)
        except queue.Empty:
            pass
        join_all(procs, TIMEOUT)
        errors = [f"rank {rank}:\n{value}" for rank, (status, value) in sorted(reports.items())
                  if status == "error"]
        assert not errors, "\n".join(errors)
        assert sorted(reports) == list(range(grid.world_size)), f"ranks reported: {sorted(reports)}"
        return [reports[rank][1] for rank in range(grid.world_size)]

    return run

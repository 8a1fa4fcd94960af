"""Fixtures of the multi-process executor tests."""

from __future__ import annotations

import os

import pytest

from shardline.executor.multiproc import MultiProcExecutor
from multiproc_helpers import make_config
from process_hygiene import assert_gone, leaked_segments, shm_segments
from stub_workers import STEP_TIMES_ENV


@pytest.fixture
def make_executor():
    """Starts executors of make_config(worker, **parallel); after the test shuts them down
    and checks that none of their workers is left."""
    made: list[MultiProcExecutor] = []

    def make(worker: str = "StubWorker", **parallel) -> MultiProcExecutor:
        executor = MultiProcExecutor(make_config(worker, **parallel))
        made.append(executor)
        return executor

    yield make
    for executor in made:
        executor.shutdown()
        assert_gone(executor.worker_pids)


@pytest.fixture
def step_times_dir(tmp_path, monkeypatch):
    """The directory where the SlowStepWorker ranks started from now on note when each
    step began and ended (multiproc_helpers.step_times reads it)."""
    directory = tmp_path / "step-times"
    directory.mkdir()
    monkeypatch.setenv(STEP_TIMES_ENV, str(directory))
    return directory


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray of 2 CPUs, one per rank, the stub workers' module importable in its
    actors (the two-node cluster of test_ray.py costs more to start, and a node agent only
    reads its own node's rings); after the module, nothing of it left in /dev/shm."""
    import ray
    here = os.path.dirname(os.path.abspath(__file__))
    before = shm_segments()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(
                 [here, os.path.dirname(here)])}})
    try:
        yield
    finally:
        ray.shutdown()
    assert not leaked_segments(before)

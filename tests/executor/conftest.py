"""Fixtures of the multi-process executor tests."""

from __future__ import annotations

import pytest

from shardline.executor.multiproc import MultiProcExecutor
from multiproc_helpers import make_config
from process_hygiene import assert_gone
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

"""Fixtures of the multi-process executor tests."""

from __future__ import annotations

import pytest

from shardline.executor.multiproc import MultiProcExecutor
from multiproc_helpers import make_config
from process_hygiene import assert_gone


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

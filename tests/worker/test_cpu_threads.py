"""The torch threads of a CPU rank: an equal share of its node's cores among the ranks on
that node, less one core left to the engine (or the node's agent)."""

from __future__ import annotations

import os

import pytest

from shardline.config import ParallelConfig
from shardline.worker.worker import RANKS_ON_NODE_ENV, cpu_threads


@pytest.fixture
def cores(monkeypatch, rng) -> int:
    """This process may run on a random number of cores."""
    count = rng.randint(2, 64)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(count)))
    return count


def test_ranks_share_the_cores_of_the_world_unless_told_their_nodes(monkeypatch, cores):
    monkeypatch.delenv(RANKS_ON_NODE_ENV, raising=False)
    parallel = ParallelConfig(tensor_parallel_size=4)
    assert cpu_threads(parallel) == max(1, (cores - 1) // 4)
    monkeypatch.setenv(RANKS_ON_NODE_ENV, "2")
    assert cpu_threads(parallel) == max(1, (cores - 1) // 2)
    assert cpu_threads(ParallelConfig()) is None  # the one rank in the engine's process


@pytest.mark.parametrize("value", ["0", "5", "two", "-1", ""])
def test_a_bad_ranks_on_node_count_is_named(monkeypatch, cores, value):
    monkeypatch.setenv(RANKS_ON_NODE_ENV, value)
    with pytest.raises(ValueError, match=rf"{RANKS_ON_NODE_ENV}='{value}' is invalid: must "
                                         r"be .* an integer in \[1, 4\]"):
        cpu_threads(ParallelConfig(tensor_parallel_size=4))

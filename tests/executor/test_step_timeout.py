"""step_timeout_s: a step not answered in time stops the workers and fails the engine,
with the workers' stacks shown first; a step that ends in time is untouched."""

from __future__ import annotations

import re
import time

import pytest

from shardline.executor.base import EngineDeadError
from shardline.executor.data_parallel import PeerCoreFailed
from multiproc_helpers import make_config, start_world, step
from process_hygiene import assert_gone
from stub_workers import SlowStepWorker


def test_a_step_past_the_timeout_stops_the_workers_and_fails_every_step_in_flight(
        make_executor, capfd, rng):
    timeout = rng.uniform(0.5, 1.5)
    executor = make_executor("SpinningWorker", tensor_parallel_size=2, step_timeout_s=timeout)
    pids = executor.worker_pids
    assert executor.execute_model(step("a")).sampled_token_ids == [1000]
    capfd.readouterr()
    started = time.monotonic()
    stuck = executor.execute_model(step("spin", "b"), non_block=True)
    behind = executor.execute_model(step("c"), non_block=True)
    message = (f"worker rank 0 (the output rank) did not answer a step within "
               f"step_timeout_s={timeout} (waited ")
    with pytest.raises(EngineDeadError, match=re.escape(message)):
        stuck.result()
    assert timeout <= time.monotonic() - started < timeout + 20
    with pytest.raises(EngineDeadError, match=re.escape(message)):
        behind.result()
    assert_gone(pids)  # stopped by the timeout itself, before any shutdown
    stacks = capfd.readouterr().err
    for rank, pid in enumerate(pids):
        assert f"--- the stacks of worker rank {rank} (pid {pid}):" in stacks, stacks[-2000:]
    assert "in execute_model" in stacks
    with pytest.raises(EngineDeadError, match=re.escape(message)):
        executor.execute_model(step("d"))


def test_a_step_that_ends_within_the_timeout_is_answered(make_executor, rng):
    timeout = SlowStepWorker.STEP_S + rng.uniform(2.0, 4.0)
    executor = make_executor("SlowStepWorker", step_timeout_s=timeout)
    output = executor.execute_model(step("a", "b"))
    assert output.req_ids == ["a", "b"] and output.sampled_token_ids == [1000, 1000]
    assert executor.collective_rpc("identity")[0][1] == executor.worker_pids[0]


def test_a_timed_out_core_fails_every_other_data_parallel_core(rng):
    """The timeout tells the death callbacks, as a dead worker's watcher does: the other
    cores (which may wait in a collective for the stopped ranks) fail at once with
    PeerCoreFailed, and every other callback (an AsyncLLM's) hears the error."""
    timeout = rng.uniform(0.5, 1.5)
    config = make_config("SpinningWorker", data_parallel_size=2, step_timeout_s=timeout)
    cores = start_world(config)
    heard: list[EngineDeadError] = []
    cores[1].add_death_callback(heard.append)
    try:
        stuck = rng.randrange(2)
        with pytest.raises(EngineDeadError, match="did not answer a step within"):
            cores[stuck].execute_model(step("spin"))
        other = cores[1 - stuck]
        with pytest.raises(PeerCoreFailed, match=re.escape(
                f"step_timeout_s={timeout}") + f".*in data-parallel rank {stuck};"):
            other.execute_model(step("a"))
        if stuck == 1:
            assert len(heard) == 1 and "did not answer a step within" in str(heard[0])
    finally:
        for core in cores:
            core.shutdown()
        assert_gone([pid for core in cores for pid in core.worker_pids])

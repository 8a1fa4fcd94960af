"""A step whose reply is long in coming is reported, not failed: after SLOW_STEP_S, and
again each time the wait doubles, a warning names the output rank and every worker writes
its Python stacks to the stderr it shares with the engine."""

from __future__ import annotations

import logging
import os
import re
import signal
import time

from shardline.executor import worker_group
from multiproc_helpers import (make_config, slow_step_reports, slow_step_reports_of_core_0,
                               start_world, step, step_times)
from process_hygiene import assert_gone
from stub_workers import SlowStepWorker


def test_a_slow_step_is_reported_with_the_workers_stacks_and_still_answers(
        make_executor, monkeypatch, caplog, capfd, rng, step_times_dir):
    slow_after = rng.uniform(0.4, 0.8)
    monkeypatch.setattr(worker_group, "SLOW_STEP_S", slow_after)
    executor = make_executor("SlowStepWorker", tensor_parallel_size=2)
    capfd.readouterr()
    sent = time.time()
    with caplog.at_level(logging.WARNING, logger="shardline"):
        output = executor.execute_model(step("a", "b"))
    returned = time.time()
    assert output.req_ids == ["a", "b"] and output.sampled_token_ids == [1000, 1000]
    reports, inside = slow_step_reports(caplog.records, sent, step_times(step_times_dir, 2))
    waits = [float(re.search(r"waited (\d+) s", message).group(1)) for message in reports]
    # Reported at slow_after, 2x, 4x, ... while the step runs: surely at each of those
    # well before its end (the reading thread, woken late, may find the reply there
    # instead), never at one past the step's return.
    thresholds = [slow_after * 2**k for k in range(8)]
    surely = sum(t < SlowStepWorker.STEP_S - 0.5 for t in thresholds)
    assert surely <= len(reports) <= sum(sent + t < returned for t in thresholds), reports
    assert all("worker rank 0 (the output rank)" in message for message in reports)
    assert all("the workers' Python stacks follow" in message for message in reports)
    assert waits == sorted(waits)
    stacks = capfd.readouterr().err
    # Each report: both workers' stacks, inside the step where it came inside.
    assert stacks.count("in execute_model") >= 2 * inside >= 2, stacks[-2000:]
    for rank, pid in enumerate(executor.worker_pids):
        assert stacks.count(f"--- the stacks of worker rank {rank} (pid {pid}):") == len(reports)
    assert executor.collective_rpc("identity")[1][1] == executor.worker_pids[1]


def test_a_slow_step_shows_the_stacks_of_every_data_parallel_core(monkeypatch, caplog,
                                                                   capfd, rng, step_times_dir):
    """Core 0's step may wait on core 1's rank (expert parallelism's all-to-all spans the
    cores), and the engine reads core 0's step first: only core 0's worker showed its
    stacks, not the rank it waited for."""
    slow_after = rng.uniform(0.4, 0.8)
    monkeypatch.setattr(worker_group, "SLOW_STEP_S", slow_after)
    cores = start_world(make_config("SlowStepWorker", data_parallel_size=2))
    try:
        capfd.readouterr()
        reports, inside = slow_step_reports_of_core_0(cores, caplog, step_times_dir)
        assert inside
        stacks = capfd.readouterr().err
        for rank, core in enumerate(cores):
            header = f"--- the stacks of worker rank {rank} (pid {core.worker_pids[0]}):"
            assert stacks.count(header) == reports, stacks[-2000:]
        assert stacks.count("in execute_model") >= 2 * inside
    finally:
        for core in cores:
            core.shutdown()
        assert_gone([pid for core in cores for pid in core.worker_pids])


def test_an_ended_worker_is_not_signalled(make_executor, capfd, rng):
    """A worker that ended between the step's timeout and the report, before the watcher
    stopped the group: its pid, once reaped, may name another process, which SIGUSR1
    would end. The others still show their stacks."""
    executor = make_executor("StubWorker", tensor_parallel_size=2)
    pids = executor.worker_pids
    victim = rng.randrange(2)
    # The watcher stands aside (as during a shutdown): it would stop the survivor.
    executor._group.stopping = True
    os.kill(pids[victim], signal.SIGKILL)
    deadline = time.monotonic() + 30
    while executor._group.procs[victim].exitcode is None:  # reaped, here or by the watcher
        assert time.monotonic() < deadline, "the killed worker did not end"
        time.sleep(0.01)
    capfd.readouterr()
    executor._group.dump_stacks()
    stacks = capfd.readouterr().err
    assert f"--- the stacks of worker rank {victim} " not in stacks, stacks[-2000:]
    assert f"--- the stacks of worker rank {1 - victim} (pid {pids[1 - victim]}):" in stacks

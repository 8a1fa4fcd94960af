"""A worker left stopped (SIGSTOP) neither dies nor answers: the executor gives the engine
up once it has stayed stopped for STOPPED_LIMIT_S, with an EngineDeadError naming it,
instead of waiting for ever; a shorter stop, or one of the whole job (the watcher was
stopped too), costs nothing. Stub workers in spawned processes, and a stopped `sleep`."""

from __future__ import annotations

import os
import signal
import subprocess
import time
import types

import pytest

from shardline.executor import EngineDeadError, stopped_workers
from shardline.executor.stopped_workers import StoppedWorkers, process_state
from multiproc_helpers import step

LIMIT_S = 1.0


@pytest.fixture
def short_limit(monkeypatch):
    monkeypatch.setattr(stopped_workers, "STOPPED_LIMIT_S", LIMIT_S)


@pytest.fixture
def stopped_process():
    """A child process stopped by SIGSTOP (killed after the test)."""
    proc = subprocess.Popen(["sleep", "60"])
    os.kill(proc.pid, signal.SIGSTOP)
    deadline = time.monotonic() + 5
    while process_state(proc.pid) != "T":
        assert time.monotonic() < deadline, "the child never showed as stopped"
        time.sleep(0.01)
    yield proc
    proc.kill()
    proc.wait()


@pytest.mark.parametrize("busy", [False, True], ids=["idle", "mid-step"])
def test_a_worker_left_stopped_kills_the_engine_naming_it(make_executor, short_limit, rng,
                                                          busy):
    """Before, a step waited for ever on a stopped rank; now it raises within the limit
    (plus the watcher's polls), and so does every later call."""
    executor = make_executor("SlowStepWorker" if busy else "StubWorker",
                             tensor_parallel_size=2, pipeline_parallel_size=2)
    victim = rng.randrange(executor.num_workers)
    pid = executor.worker_pids[victim]
    future = executor.execute_model(step("a"), non_block=True) if busy else None
    os.kill(pid, signal.SIGSTOP)
    stopped = time.monotonic()
    stalled = rf"worker rank {victim} \(pid {pid}\) has been stopped \(SIGSTOP"
    with pytest.raises(EngineDeadError, match=stalled):
        if future is not None:
            future.result(timeout=30)
        executor.collective_rpc("echo", args=(1,), timeout=30)
    elapsed = time.monotonic() - stopped
    print(f"EngineDeadError {elapsed:.2f} s after SIGSTOP of rank {victim}")
    assert LIMIT_S <= elapsed < LIMIT_S + 4.0
    with pytest.raises(EngineDeadError, match=stalled):
        executor.execute_model(step("b"))


def test_a_stop_shorter_than_the_limit_costs_nothing(make_executor, short_limit, rng):
    executor = make_executor(tensor_parallel_size=2)
    pid = executor.worker_pids[rng.randrange(2)]
    os.kill(pid, signal.SIGSTOP)
    time.sleep(LIMIT_S * rng.uniform(0.3, 0.7))
    os.kill(pid, signal.SIGCONT)
    time.sleep(LIMIT_S * 1.5)
    value = rng.randrange(1000)
    assert executor.collective_rpc("echo", args=(value,), timeout=30) == [value, value]


def fake_clock(monkeypatch, rng) -> list[float]:
    """The clock stopped_workers reads (and only it), set by the test: a random start, a
    whole number of half seconds, so that adding half seconds is exact. (From a start of
    rng.uniform(0, 1000), 20 steps of 0.5 added up to less than 10.0 in 1.25% of the
    starts, those crossing a power of two, and the test failed.)"""
    clock = [rng.randrange(2000) / 2]
    monkeypatch.setattr(stopped_workers, "time", types.SimpleNamespace(monotonic=lambda: clock[0]))
    return clock


def test_a_process_stopped_past_the_limit_is_named_with_its_time(stopped_process, monkeypatch,
                                                                 rng):
    clock = fake_clock(monkeypatch, rng)
    watch = StoppedWorkers()
    pids = [os.getpid(), stopped_process.pid]
    assert watch.poll(pids) == []
    for _ in range(int(stopped_workers.STOPPED_LIMIT_S / 0.5) - 1):
        clock[0] += 0.5
        assert watch.poll(pids) == []
    clock[0] += 0.5
    assert watch.poll(pids) == [(1, pytest.approx(stopped_workers.STOPPED_LIMIT_S))]


def test_a_gap_in_the_polls_starts_the_count_again(stopped_process, monkeypatch, rng):
    """The watcher's own process stopped with its workers (a job's Ctrl-Z, then fg): the
    first poll after the gap must not count the time the whole job was stopped."""
    clock = fake_clock(monkeypatch, rng)
    watch = StoppedWorkers()
    assert watch.poll([stopped_process.pid]) == []
    clock[0] += stopped_workers.STOPPED_LIMIT_S * rng.uniform(2, 10)
    assert watch.poll([stopped_process.pid]) == []
    clock[0] += stopped_workers.POLL_GAP_S / 2
    assert watch.poll([stopped_process.pid]) == []


def test_a_gone_process_has_no_state(stopped_process):
    assert process_state(os.getpid()) in ("R", "S")
    stopped_process.kill()
    stopped_process.wait()
    assert process_state(stopped_process.pid) is None

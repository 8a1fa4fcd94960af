"""Peers of a shared-memory ring of shardline._shm that die, wait or are slow: a killed
writer or reader raises PeerDied in its peer within a second, a dead sleeper costs the
writer one wake, wait_attached sees readers that die before attaching and waits for slow
live ones, a write before every reader attached raises, Ctrl-C interrupts an endless
wait, and a blocked reader uses almost no CPU."""

from __future__ import annotations

import os
import random
import signal
import time
from multiprocessing.connection import wait as wait_for_exit

import numpy as np
import psutil
import pytest
from launcher import SPAWN, join_all, spawn
from shm_helpers import (
    DATA_WAIT_SLEEPERS,
    TIMEOUT,
    blocked_reader,
    expect_event,
    idle_reader,
    idle_writer,
    kill_after,
    late_reader,
    mapped_head,
    never_attaching_reader,
    shm_path,
    sleepers,
    wait_asleep,
)

from shardline._shm import PeerDied, Ring


def test_write_before_every_reader_attached_raises_instead_of_waiting_forever():
    with Ring.create(3, 2, 64) as writer, Ring.attach(writer.name, 1) as reader:
        with pytest.raises(RuntimeError, match=r"write: ring .* has 1 of 3 readers attached \(missing: 0, 2\)"
                                               r".*call wait_attached\(timeout, reader_pids="):
            writer.write(b"x")
        late = [Ring.attach(writer.name, i) for i in (0, 2)]
        writer.wait_attached(timeout=1)
        message = os.urandom(random.randrange(0, 2 * 64 + 1))
        writer.write(message, timeout=1)
        assert [ring.read(timeout=1) for ring in (reader, *late)] == [message] * 3


def test_ctrl_c_interrupts_a_wait_without_timeout():
    events = SPAWN.Queue()
    with Ring.create(1, 4, 64) as writer, mapped_head(writer.name) as head:
        child = spawn(blocked_reader, writer.name, events, None)
        child_pid = expect_event(events, "ready")
        # A SIGINT before the child is inside read() would end it outside the wait.
        wait_asleep(head, DATA_WAIT_SLEEPERS)
        interrupted_at = time.monotonic()
        os.kill(child_pid, signal.SIGINT)
        assert expect_event(events, "KeyboardInterrupt") - interrupted_at < 1.0
        join_all([child], TIMEOUT)


def test_writer_sigkilled_while_reader_waits_raises_peer_died_within_a_second():
    events = SPAWN.Queue()
    child = spawn(idle_writer, events)
    name = expect_event(events, "name")
    with Ring.attach(name, 0) as reader:
        assert not os.path.exists(shm_path(name))
        assert reader.read(timeout=TIMEOUT) == b"hello"
        killed_at = kill_after(child.pid, 0.3)
        with pytest.raises(PeerDied, match="writer"):
            reader.read(timeout=TIMEOUT)
        assert time.monotonic() - killed_at[0] < 1.0
    child.join(TIMEOUT)
    assert not os.path.exists(shm_path(name))


def test_reader_sigkilled_while_writer_blocks_on_full_ring_raises_peer_died_within_a_second():
    events = SPAWN.Queue()
    with Ring.create(1, 4, 64) as writer:
        child = spawn(idle_reader, writer.name, events)
        child_pid = expect_event(events, "ready")
        writer.wait_attached(timeout=TIMEOUT)
        assert not os.path.exists(shm_path(writer.name))
        for _ in range(4):
            writer.write(b"x", timeout=1)
        killed_at = kill_after(child_pid, 0.3)
        with pytest.raises(PeerDied, match=f"reader 0 \\(pid {child_pid}\\)"):
            writer.write(b"x", timeout=TIMEOUT)
        assert time.monotonic() - killed_at[0] < 1.0
    child.join(TIMEOUT)


def test_a_reader_killed_asleep_costs_the_writer_one_wake_not_one_per_publish():
    """A reader SIGKILLed inside futex_wait cannot lower the word that makes every publish
    wake sleepers; the first publish after its death must clear it."""
    events = SPAWN.Queue()
    with Ring.create(2, 4, 64) as writer, mapped_head(writer.name) as head:
        child = spawn(blocked_reader, writer.name, events)
        expect_event(events, "ready")
        with Ring.attach(writer.name, 1) as live:
            wait_asleep(head, DATA_WAIT_SLEEPERS)
            os.kill(child.pid, signal.SIGKILL)
            child.join(TIMEOUT)
            messages = [os.urandom(random.randrange(0, 64)) for _ in range(3)]
            for message in messages:
                writer.write(message, timeout=1)
                assert sleepers(head, DATA_WAIT_SLEEPERS) == 0
            assert [live.read(timeout=1) for _ in messages] == messages


@pytest.mark.parametrize("death", ["exit", "SIGKILL"])
def test_wait_attached_raises_peer_died_soon_after_a_listed_reader_dies_unattached(death):
    events = SPAWN.Queue()
    with Ring.create(2, 4, 64) as writer:
        live = spawn(late_reader, writer.name, 0.0, events)
        expect_event(events, "ready")
        doomed = spawn(never_attaching_reader, 0.0 if death == "exit" else TIMEOUT)
        if death == "exit":
            # The sentinel does not reap the child: the wait must see through the zombie.
            assert wait_for_exit([doomed.sentinel], TIMEOUT), "the reader did not exit"
            died_at = time.monotonic()
        else:
            killed_at = kill_after(doomed.pid, 0.3)
        with pytest.raises(PeerDied, match=f"reader process {doomed.pid} .*\\(1 of 2 attached\\)"):
            writer.wait_attached(timeout=TIMEOUT, reader_pids=[live.pid, doomed.pid])
        assert time.monotonic() - (died_at if death == "exit" else killed_at[0]) < 1.0
    join_all([live], TIMEOUT)
    doomed.join(TIMEOUT)


def test_wait_attached_with_reader_pids_still_waits_for_a_slow_live_reader():
    events = SPAWN.Queue()
    with Ring.create(1, 4, 64) as writer:
        reader = spawn(late_reader, writer.name, 1.0, events)
        writer.wait_attached(timeout=TIMEOUT, reader_pids=(reader.pid,))
        assert expect_event(events, "ready") == reader.pid
        writer.write(b"hello", timeout=TIMEOUT)
        expect_event(events, "message")
    join_all([reader], TIMEOUT)


def test_wait_attached_takes_any_int_pids_of_live_processes_and_still_times_out():
    with Ring.create(2, 4, 64) as writer:
        for reader_pids in ([np.int64(os.getpid()), os.getppid()], (os.getpid(),), [], None):
            with pytest.raises(TimeoutError):
                writer.wait_attached(timeout=0.05, reader_pids=reader_pids)


def test_idle_blocked_reader_uses_almost_no_cpu():
    events = SPAWN.Queue()
    with Ring.create(1, 4, 64) as writer, mapped_head(writer.name) as head:
        child = spawn(blocked_reader, writer.name, events)
        expect_event(events, "ready")
        process = psutil.Process(child.pid)
        wait_asleep(head, DATA_WAIT_SLEEPERS)
        before = process.cpu_times()
        time.sleep(2.0)
        after = process.cpu_times()
        writer.close()
        expect_event(events, "RingClosed")
        join_all([child], TIMEOUT)
    used = (after.user + after.system) - (before.user + before.system)
    assert used < 0.05 * 2.0, f"idle reader used {used:.3f} s of CPU in 2 s"

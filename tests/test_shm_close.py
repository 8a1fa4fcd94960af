"""Closing a shared-memory ring of shardline._shm, or dropping one of its ends: waiters in
this process and in others wake with RingClosed, messages written before the close are
still delivered (also when the writer publishes just as the reader leaves its spin), and a
forked copy of an end does not close the ring."""

from __future__ import annotations

import gc
import os
import random
import threading
import time

import pytest
from launcher import FORKS_ON_PURPOSE, SPAWN, join_all, spawn
from shm_helpers import (
    DATA_WAIT_SLEEPERS,
    SPACE_WAIT_SLEEPERS,
    TIMEOUT,
    blocked_reader,
    blocked_writer,
    expect_event,
    mapped_head,
    paused_after_spin,
    wait_asleep,
    write_then_die,
)

from shardline._shm import PeerDied, Ring, RingClosed


def test_close_wakes_a_blocked_reader_in_another_process():
    events = SPAWN.Queue()
    with Ring.create(1, 4, 64) as writer, mapped_head(writer.name) as head:
        child = spawn(blocked_reader, writer.name, events)
        expect_event(events, "ready")
        wait_asleep(head, DATA_WAIT_SLEEPERS)
        closed_at = time.monotonic()
        writer.close()
        assert expect_event(events, "RingClosed") - closed_at < 1.0
        join_all([child], TIMEOUT)


def test_close_wakes_a_blocked_writer_in_another_process():
    events = SPAWN.Queue()
    child = spawn(blocked_writer, 4, events)
    name = expect_event(events, "name")
    with mapped_head(name) as head, Ring.attach(name, 0) as reader:
        expect_event(events, "ready")
        wait_asleep(head, SPACE_WAIT_SLEEPERS)
        closed_at = time.monotonic()
        reader.close()
        assert expect_event(events, "RingClosed") - closed_at < 1.0
    join_all([child], TIMEOUT)


def test_close_wakes_waiters_in_the_same_process_and_later_calls_raise():
    with Ring.create(1, 4, 64) as writer, mapped_head(writer.name) as head, \
            Ring.attach(writer.name, 0) as reader:
        outcome = []

        def wait() -> None:
            with pytest.raises(RingClosed):
                reader.read(timeout=TIMEOUT)
            outcome.append(time.monotonic())

        waiter = threading.Thread(target=wait)
        waiter.start()
        wait_asleep(head, DATA_WAIT_SLEEPERS)
        closed_at = time.monotonic()
        writer.close()
        writer.close()
        waiter.join(TIMEOUT)
        assert outcome and outcome[0] - closed_at < 2.0
        with pytest.raises(RingClosed):
            writer.write(b"x", timeout=1)
        with pytest.raises(RingClosed):
            reader.read(timeout=1)


def test_messages_written_before_close_are_still_delivered():
    with Ring.create(1, 4, 64) as writer, Ring.attach(writer.name, 0) as reader:
        writer.write(b"last words", timeout=1)
        writer.close()
        assert reader.read(timeout=1) == b"last words"
        with pytest.raises(RingClosed):
            reader.read(timeout=1)


def outcomes_in_thread(*calls) -> tuple[threading.Thread, list]:
    """Runs the calls one after another in a thread; the list gets, for each, what it
    returned or the name of the ring error it raised."""
    outcomes = []

    def run() -> None:
        for call in calls:
            try:
                outcomes.append(call())
            except (RingClosed, PeerDied, TimeoutError) as error:
                outcomes.append(type(error).__name__)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, outcomes


@pytest.mark.parametrize("message_slots", [1, 5])
def test_message_written_as_the_reader_leaves_its_spin_is_delivered_before_ring_closed(message_slots):
    """The writer publishes and closes at a random moment while the reader waits. The
    reader's exit from its spin is stretched to 2 ms, so that most trials publish inside
    that window. A 5-slot message through a 2-slot ring ends while the reader is mid-message."""
    seed = random.SystemRandom().randrange(2**32)
    print(f"close race seed {seed}")
    rng = random.Random(seed)
    slot = 16
    with paused_after_spin(0.002):
        for trial in range(100):
            message = rng.randbytes(message_slots * slot - rng.randrange(slot))
            with Ring.create(1, 2, slot) as writer, Ring.attach(writer.name, 0) as reader:
                read = lambda: reader.read(timeout=5)  # noqa: E731
                thread, outcomes = outcomes_in_thread(read, read)
                time.sleep(rng.uniform(0, 0.003))
                writer.write(message, timeout=TIMEOUT)
                writer.close()
                thread.join(TIMEOUT)
            assert outcomes == [message, "RingClosed"], f"trial {trial}"


def test_message_written_as_the_reader_leaves_its_spin_is_delivered_before_peer_died():
    """The writer process publishes and dies (closing nothing) while the reader's exit from
    its spin is stretched to 0.5 s: the reader gets the message, then PeerDied."""
    message = os.urandom(random.randrange(0, 4 * 64))
    events = SPAWN.Queue()
    go_receiver, go_sender = SPAWN.Pipe(duplex=False)
    child = spawn(write_then_die, message, 0.05, events, go_receiver)
    with Ring.attach(expect_event(events, "name"), 0) as reader, paused_after_spin(0.5):
        go_sender.send(True)
        assert reader.read(timeout=TIMEOUT) == message
        with pytest.raises(PeerDied, match="writer"):
            reader.read(timeout=TIMEOUT)
    join_all([child], TIMEOUT)


def test_dropping_the_writer_closes_the_ring_for_a_blocked_reader():
    writer = Ring.create(1, 4, 64)
    with mapped_head(writer.name) as head:
        reader = Ring.attach(writer.name, 0)
        writer.write(b"last", timeout=1)
        read = lambda: reader.read(timeout=5)  # noqa: E731
        thread, outcomes = outcomes_in_thread(read, read)
        wait_asleep(head, DATA_WAIT_SLEEPERS)  # in the second read
        dropped_at = time.monotonic()
        del writer
        thread.join(TIMEOUT)
    assert outcomes == [b"last", "RingClosed"]
    assert time.monotonic() - dropped_at < 2.0


def test_dropping_a_reader_closes_the_ring_for_a_blocked_writer():
    writer = Ring.create(2, 2, 64)
    with mapped_head(writer.name) as head:
        readers = [Ring.attach(writer.name, i) for i in range(2)]
        for _ in range(2):
            writer.write(b"x", timeout=1)
        thread, outcomes = outcomes_in_thread(lambda: writer.write(b"y", timeout=5))
        wait_asleep(head, SPACE_WAIT_SLEEPERS)
        dropped_at = time.monotonic()
        readers.pop()
        thread.join(TIMEOUT)
    assert outcomes == ["RingClosed"]
    assert time.monotonic() - dropped_at < 2.0
    assert [readers[0].read(timeout=1) for _ in range(2)] == [b"x", b"x"]


@FORKS_ON_PURPOSE
def test_a_forked_copy_of_an_end_does_not_close_the_ring_when_dropped():
    writer = Ring.create(1, 4, 64)
    reader = Ring.attach(writer.name, 0)
    try:
        pid = os.fork()
        if pid == 0:
            try:
                del writer, reader
                gc.collect()
            finally:
                os._exit(0)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        message = os.urandom(random.randrange(1, 64))
        writer.write(message, timeout=1)
        assert reader.read(timeout=1) == message
    finally:
        writer.close()

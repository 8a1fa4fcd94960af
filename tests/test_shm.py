"""The shared-memory rings of shardline._shm: correctness across processes, waiting,
liveness, close and argument checking. Segment hygiene is in test_shm_hygiene.py."""

from __future__ import annotations

import gc
import mmap
import os
import random
import signal
import threading
import time
from multiprocessing.connection import wait as wait_for_exit

import numpy as np
import psutil
import pytest
from launcher import SPAWN, join_all, spawn
from shm_helpers import (
    TIMEOUT,
    MessageStream,
    blocked_reader,
    blocked_writer,
    echo_responder,
    expect_event,
    fuzz_reader,
    idle_reader,
    idle_writer,
    kill_after,
    late_reader,
    never_attaching_reader,
    paused_after_spin,
    shm_path,
    write_then_die,
)

from shardline._shm import PeerDied, Ring, RingClosed, raw_handoff_latency

SLOT = 256
SLOTS = 64
# Byte offset of the data wait line's `sleepers` word in a ring segment (csrc/layout.hpp).
DATA_WAIT_SLEEPERS = 196


def test_fuzz_one_writer_three_readers_every_message_once_in_order_intact():
    seed = random.SystemRandom().randrange(2**32)
    print(f"fuzz seed {seed}")
    ring_bytes = SLOT * SLOTS
    stream_args = (seed, 100_000, 4 * SLOT, (ring_bytes + 1, 3 * ring_bytes), 500)
    stream = MessageStream(*stream_args)
    assert stream.sizes.min() == 0 and stream.sizes.max() > ring_bytes
    results = SPAWN.Queue()
    with Ring.create(3, SLOTS, SLOT) as ring:
        readers = [spawn(fuzz_reader, ring.name, i, stream_args, i == 2, results) for i in range(3)]
        ring.wait_attached(timeout=TIMEOUT)
        for i in range(len(stream)):
            ring.write(stream.message(i), timeout=TIMEOUT)
        outcomes = [results.get(timeout=TIMEOUT) for _ in readers]
        join_all(readers, TIMEOUT)
    assert outcomes == [("ok", len(stream))] * 3


def test_attributes_describe_each_side_and_sides_keep_to_their_role():
    n_readers, n_slots, slot_size = random.randint(2, 64), random.randint(1, 100), random.randint(1, 5000)
    with Ring.create(n_readers, n_slots, slot_size) as writer:
        index = random.randrange(n_readers)
        with Ring.attach(writer.name, index) as reader:
            for ring in (writer, reader):
                assert (ring.name, ring.n_readers, ring.n_slots, ring.slot_size) == (
                    writer.name, n_readers, n_slots, slot_size)
            assert (writer.reader_index, reader.reader_index) == (-1, index)
            with pytest.raises(RuntimeError, match="for a reader"):
                writer.read(timeout=0)
            with pytest.raises(RuntimeError, match="for the writer"):
                reader.write(b"x", timeout=0)
            with pytest.raises(TimeoutError):
                writer.wait_attached(timeout=0.1)


def test_parts_are_one_message_and_big_messages_stream_through_a_small_ring():
    with Ring.create(1, 8, 16) as writer, Ring.attach(writer.name, 0) as reader:
        parts = [os.urandom(n) for n in (0, 5, 16, 33)]
        writer.write_parts([parts[0], bytearray(parts[1]), memoryview(parts[2]), parts[3]], timeout=1)
        writer.write(b"", timeout=1)
        assert reader.read(timeout=1) == b"".join(parts)
        assert reader.read(timeout=1) == b""

        big = os.urandom(10 * 8 * 16 + 7)
        sender = threading.Thread(target=writer.write, args=(big,), kwargs={"timeout": TIMEOUT})
        sender.start()
        received = reader.read(timeout=TIMEOUT)
        sender.join(TIMEOUT)
        assert received == big


def test_read_that_times_out_midway_resumes_the_same_message():
    with Ring.create(2, 4, 16) as writer, Ring.attach(writer.name, 0) as slow, Ring.attach(writer.name, 1) as fast:
        big = os.urandom(3 * 4 * 16)
        sender = threading.Thread(target=writer.write, args=(big,), kwargs={"timeout": TIMEOUT})
        sender.start()
        with pytest.raises(TimeoutError):
            fast.read(timeout=0.2)
        slow_received = []
        drainer = threading.Thread(target=lambda: slow_received.append(slow.read(timeout=TIMEOUT)))
        drainer.start()
        assert fast.read(timeout=TIMEOUT) == big
        drainer.join(TIMEOUT)
        sender.join(TIMEOUT)
        assert slow_received == [big]


def test_spsc_request_response_rings():
    count = 2000
    names = SPAWN.Queue()
    with Ring.create(1, 8, 128) as requests:
        responder = spawn(echo_responder, requests.name, names, count)
        with Ring.attach(names.get(timeout=TIMEOUT), 0) as responses:
            requests.wait_attached(timeout=TIMEOUT)
            for _ in range(count):
                request = os.urandom(random.randrange(0, 600))
                requests.write(request, timeout=TIMEOUT)
                assert responses.read(timeout=TIMEOUT) == request[::-1]
        join_all([responder], TIMEOUT)


def test_read_on_empty_ring_times_out_near_the_timeout():
    with Ring.create(1, 4, 64) as writer, Ring.attach(writer.name, 0) as reader:
        for timeout in (0.0, 0.2):
            start = time.monotonic()
            with pytest.raises(TimeoutError):
                reader.read(timeout=timeout)
            assert timeout <= time.monotonic() - start < timeout + 2.0


def test_write_on_full_ring_times_out_and_the_ring_stays_usable():
    with Ring.create(1, 4, 64) as writer, Ring.attach(writer.name, 0) as reader:
        for i in range(4):
            writer.write(bytes([i]) * 64, timeout=1)
        start = time.monotonic()
        with pytest.raises(TimeoutError):
            writer.write(b"late", timeout=0.2)
        assert 0.2 <= time.monotonic() - start < 2.0
        assert [reader.read(timeout=1) for _ in range(4)] == [bytes([i]) * 64 for i in range(4)]
        writer.write(b"after", timeout=1)
        assert reader.read(timeout=1) == b"after"


def test_writer_timeout_midway_drops_the_partial_message_for_readers():
    with Ring.create(1, 4, 16) as writer, Ring.attach(writer.name, 0) as reader:
        with pytest.raises(TimeoutError):
            writer.write(os.urandom(16 * 10), timeout=0.1)
        received = []
        receiver = threading.Thread(target=lambda: received.append(reader.read(timeout=TIMEOUT)))
        receiver.start()
        writer.write(b"next", timeout=TIMEOUT)
        receiver.join(TIMEOUT)
        assert received == [b"next"]


def test_close_wakes_a_blocked_reader_in_another_process():
    events = SPAWN.Queue()
    with Ring.create(1, 4, 64) as writer:
        child = spawn(blocked_reader, writer.name, events)
        expect_event(events, "ready")
        time.sleep(0.3)
        writer.close()
        assert expect_event(events, "RingClosed") < 1.5
        join_all([child], TIMEOUT)


def test_close_wakes_a_blocked_writer_in_another_process():
    events = SPAWN.Queue()
    child = spawn(blocked_writer, 4, events)
    with Ring.attach(expect_event(events, "name"), 0) as reader:
        expect_event(events, "ready")
        time.sleep(0.3)
        reader.close()
        assert expect_event(events, "RingClosed") < 1.5
    join_all([child], TIMEOUT)


def test_close_wakes_waiters_in_the_same_process_and_later_calls_raise():
    with Ring.create(1, 4, 64) as writer, Ring.attach(writer.name, 0) as reader:
        outcome = []

        def wait() -> None:
            with pytest.raises(RingClosed):
                reader.read(timeout=TIMEOUT)
            outcome.append(time.monotonic())

        waiter = threading.Thread(target=wait)
        waiter.start()
        time.sleep(0.2)
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
    reader = Ring.attach(writer.name, 0)
    writer.write(b"last", timeout=1)
    read = lambda: reader.read(timeout=5)  # noqa: E731
    thread, outcomes = outcomes_in_thread(read, read)
    time.sleep(0.2)
    dropped_at = time.monotonic()
    del writer
    thread.join(TIMEOUT)
    assert outcomes == [b"last", "RingClosed"]
    assert time.monotonic() - dropped_at < 2.0


def test_dropping_a_reader_closes_the_ring_for_a_blocked_writer():
    writer = Ring.create(2, 2, 64)
    readers = [Ring.attach(writer.name, i) for i in range(2)]
    for _ in range(2):
        writer.write(b"x", timeout=1)
    thread, outcomes = outcomes_in_thread(lambda: writer.write(b"y", timeout=5))
    time.sleep(0.2)
    dropped_at = time.monotonic()
    readers.pop()
    thread.join(TIMEOUT)
    assert outcomes == ["RingClosed"]
    assert time.monotonic() - dropped_at < 2.0
    assert [readers[0].read(timeout=1) for _ in range(2)] == [b"x", b"x"]


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
    with Ring.create(1, 4, 64) as writer:
        child = spawn(blocked_reader, writer.name, events, None)
        child_pid = expect_event(events, "ready")
        time.sleep(0.3)
        os.kill(child_pid, signal.SIGINT)
        assert expect_event(events, "KeyboardInterrupt") < 1.5
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
    with Ring.create(2, 4, 64) as writer:
        with open(shm_path(writer.name), "r+b") as segment, mmap.mmap(segment.fileno(), 4096) as mapped:
            child = spawn(blocked_reader, writer.name, events)
            expect_event(events, "ready")
            with Ring.attach(writer.name, 1) as live:

                def sleepers() -> int:
                    return int.from_bytes(mapped[DATA_WAIT_SLEEPERS : DATA_WAIT_SLEEPERS + 4], "little")

                deadline = time.monotonic() + TIMEOUT
                while sleepers() == 0 and time.monotonic() < deadline:
                    time.sleep(0.01)
                assert sleepers() != 0, "the blocked reader never went to sleep"
                os.kill(child.pid, signal.SIGKILL)
                child.join(TIMEOUT)
                messages = [os.urandom(random.randrange(0, 64)) for _ in range(3)]
                for message in messages:
                    writer.write(message, timeout=1)
                    assert sleepers() == 0
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


@pytest.mark.parametrize(
    ("reader_pids", "error", "message"),
    [
        ("12", TypeError, r"reader_pids must be None or a list of process ids \(ints\), got str"),
        (12, TypeError, r"reader_pids must be None or a list of process ids \(ints\), got int"),
        ([1.0], TypeError, r"reader_pids\[0\] must be an int process id, got float 1.0"),
        ([1, True], TypeError, r"reader_pids\[1\] must be an int process id, got bool True"),
        ([0], ValueError, r"reader_pids\[0\] must be in \[1, 2147483647\], got 0"),
        ([1, -3], ValueError, r"reader_pids\[1\] must be in \[1, 2147483647\], got -3"),
        ([2**31], ValueError, r"reader_pids\[0\] must be in \[1, 2147483647\], got 2147483648"),
        ([2**70], ValueError, rf"reader_pids\[0\] must be in \[1, 2147483647\], got {2**70}$"),
        ([7, 7], ValueError, r"reader_pids lists pid 7 twice \(at 0 and 1\)"),
        ([1, 2, 3], ValueError, r"reader_pids lists 3 processes but ring .* has only 2 readers"),
    ],
)
def test_wait_attached_rejects_bad_reader_pids(reader_pids, error, message):
    with Ring.create(2, 4, 64) as writer:
        with pytest.raises(error, match=message):
            writer.wait_attached(timeout=0, reader_pids=reader_pids)


def test_wait_attached_takes_any_int_pids_of_live_processes_and_still_times_out():
    with Ring.create(2, 4, 64) as writer:
        for reader_pids in ([np.int64(os.getpid()), os.getppid()], (os.getpid(),), [], None):
            with pytest.raises(TimeoutError):
                writer.wait_attached(timeout=0.05, reader_pids=reader_pids)


def test_idle_blocked_reader_uses_almost_no_cpu():
    events = SPAWN.Queue()
    with Ring.create(1, 4, 64) as writer:
        child = spawn(blocked_reader, writer.name, events)
        expect_event(events, "ready")
        process = psutil.Process(child.pid)
        time.sleep(0.3)
        before = process.cpu_times()
        time.sleep(2.0)
        after = process.cpu_times()
        writer.close()
        expect_event(events, "RingClosed")
        join_all([child], TIMEOUT)
    used = (after.user + after.system) - (before.user + before.system)
    assert used < 0.05 * 2.0, f"idle reader used {used:.3f} s of CPU in 2 s"


@pytest.mark.parametrize(
    ("args", "argument"),
    [
        ((0, 4, 64), "n_readers"),
        ((65, 4, 64), "n_readers"),
        ((-1, 4, 64), "n_readers"),
        ((1, 0, 64), "n_slots"),
        ((1, 2**40, 64), "n_slots"),
        ((1, 4, 0), "slot_size"),
        ((1, 4, 2**27), "slot_size"),
        ((1, 2**20, 2**26), "n_slots \\* slot_size"),
    ],
)
def test_create_rejects_bad_geometry(args, argument):
    with pytest.raises(ValueError, match=f"^{argument} must be"):
        Ring.create(*args)


def test_attach_rejects_bad_reader_index_and_names():
    with Ring.create(2, 4, 64) as writer:
        for index in (-1, 2, 64):
            with pytest.raises(ValueError, match=r"reader_index must be in \[0, 1\]"):
                Ring.attach(writer.name, index)
        with Ring.attach(writer.name, 0):
            with pytest.raises(ValueError, match="reader_index 0 .* already attached"):
                Ring.attach(writer.name, 0)
    with pytest.raises(FileNotFoundError, match="name"):
        Ring.attach("/shardline-" + os.urandom(16).hex(), 0)
    with pytest.raises(ValueError, match="name must look like"):
        Ring.attach("no-slash", 0)


def test_attach_rejects_foreign_segments():
    name = "/shardline-test-" + os.urandom(8).hex()
    try:
        with open(shm_path(name), "wb") as segment:
            segment.write(b"\0" * 16)
        with pytest.raises(ValueError, match="name: .* not a shardline ring"):
            Ring.attach(name, 0)
        with open(shm_path(name), "wb") as segment:
            segment.write(os.urandom(1 << 16))
        with pytest.raises(ValueError, match="name: .* has magic"):
            Ring.attach(name, 0)
    finally:
        os.unlink(shm_path(name))

    with Ring.create(2, 4, 64) as writer:
        with open(shm_path(writer.name), "r+b") as segment, mmap.mmap(segment.fileno(), 0) as header:
            header[8:12] = (99).to_bytes(4, "little")
        with pytest.raises(ValueError, match="name: .* version 99"):
            Ring.attach(writer.name, 0)


def test_bad_timeout_is_rejected():
    with Ring.create(1, 4, 64) as writer, Ring.attach(writer.name, 0) as reader:
        with pytest.raises(ValueError, match="timeout must be None or"):
            reader.read(timeout=-1)
        with pytest.raises(ValueError, match="timeout must be None or"):
            writer.write(b"x", timeout=float("nan"))


def test_raw_handoff_latency_returns_one_positive_sample_per_message():
    samples = raw_handoff_latency(64, 500)
    assert len(samples) == 500 and all(0 < ns < 10**9 for ns in samples)
    with pytest.raises(ValueError, match="payload_bytes"):
        raw_handoff_latency(4, 10)

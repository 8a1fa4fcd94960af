"""Child-process bodies, the seeded message stream and the test-side helpers of
tests/test_shm*.py (the rings) and tests/test_shm_hygiene.py; a ring with its segment
mapped, for the tests that corrupt it.

Spawned children import this module by name, so everything here is module-level.
"""

from __future__ import annotations

import mmap
import os
import signal
import struct
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from multiprocessing.connection import Connection
from multiprocessing.queues import Queue

import numpy as np

from shardline._shm import PeerDied, Ring, RingClosed, _set_pause_after_spin

TIMEOUT = 30.0


def shm_path(name: str) -> str:
    return "/dev/shm" + name


MAX_MESSAGE_BYTES = 4 << 30  # csrc/layout.hpp kMaxMessageBytes
# Byte offsets of the `sleepers` words of a segment's wait lines for data (readers sleep
# there) and for space (the writer does): SegmentHeader and WriteCursor fill the first two
# cache lines, each WaitLine one more (csrc/layout.hpp).
DATA_WAIT_SLEEPERS = 196
SPACE_WAIT_SLEEPERS = 260
# SegmentHeader: magic u64, version u32, n_readers u32, n_slots u64, slot_size u64,
# slot_stride u64, segment_bytes u64 (csrc/layout.hpp); SlotHeader: seq u64,
# message_bytes u64, bytes u32, flags u32.
GEOMETRY = struct.Struct("<16xQQQQ")
MESSAGE_BYTES = struct.Struct("<Q")


def ring_with_segment(n_slots: int, slot_size: int) -> tuple[Ring, Ring, mmap.mmap]:
    """A writer, its one reader, and a mapping of their segment (made before the reader
    attaches, as the last attacher unlinks the name)."""
    writer = Ring.create(1, n_slots, slot_size)
    with open(shm_path(writer.name), "r+b") as segment:
        mapping = mmap.mmap(segment.fileno(), 0)
    reader = Ring.attach(writer.name, 0)
    writer.wait_attached(5.0)
    return writer, reader, mapping


def message_bytes_offset(mapping: mmap.mmap, seq: int) -> int:
    """Where in the segment the slot of sequence `seq` keeps its message's size."""
    n_slots, _, stride, segment_bytes = GEOMETRY.unpack_from(mapping)
    return segment_bytes - n_slots * stride + (seq % n_slots) * stride + 8


@contextmanager
def mapped_head(name: str) -> Iterator[mmap.mmap]:
    """The head of ring `name`'s segment (header and wait lines), mapped; open it before the
    last attacher unlinks the name."""
    with open(shm_path(name), "r+b") as segment, mmap.mmap(segment.fileno(), 4096) as head:
        yield head


def sleepers(head: mmap.mmap, offset: int) -> int:
    """The `sleepers` word at `offset` of a mapped segment head: nonzero while a waiter
    sleeps on that wait line."""
    return int.from_bytes(head[offset : offset + 4], "little")


def wait_asleep(head: mmap.mmap, offset: int) -> None:
    """Returns once a waiter sleeps on the wait line whose `sleepers` word is at `offset`:
    past its spin, inside the wait's loop, where a close, a signal or a death must end it.
    Tests wait for this instead of sleeping a guessed time, which a busy machine outlasts."""
    deadline = time.monotonic() + TIMEOUT
    while sleepers(head, offset) == 0:
        assert time.monotonic() < deadline, f"no waiter went to sleep within {TIMEOUT} s"
        time.sleep(0.005)


def expect_event(events: Queue, kind: str) -> object:
    event, value = events.get(timeout=TIMEOUT)
    assert event == kind, f"expected {kind!r} from the child, got {(event, value)!r}"
    return value


@contextmanager
def paused_after_spin(seconds: float) -> Iterator[None]:
    """Makes every ring wait in this process that outlasts its spin phase sleep `seconds`
    before it first looks at close and liveness: a deterministic stand-in for a waiter
    preempted right at the end of its spin."""
    _set_pause_after_spin(seconds)
    try:
        yield
    finally:
        _set_pause_after_spin(0)


def kill_after(pid: int, delay: float) -> list[float]:
    """SIGKILLs `pid` after `delay` seconds from a timer thread; returns [time of the kill]."""
    killed_at: list[float] = []

    def kill() -> None:
        killed_at.append(time.monotonic())
        os.kill(pid, signal.SIGKILL)

    threading.Timer(delay, kill).start()
    return killed_at


class MessageStream:
    """A reproducible sequence of payloads: the writer and every reader rebuild the same
    one from the seed, so a reader checks each message byte for byte without a side channel.
    """

    def __init__(self, seed: int, count: int, max_small: int, large_range: tuple[int, int], large_every: int):
        rng = np.random.default_rng(seed)
        self.sizes = rng.integers(0, max_small + 1, count)
        large = rng.integers(0, count, max(1, count // large_every))
        self.sizes[large] = rng.integers(large_range[0], large_range[1] + 1, large.size)
        self.pool = rng.integers(0, 256, int(self.sizes.max()) + 65536, dtype=np.uint8).tobytes()
        self.offsets = rng.integers(0, len(self.pool) - self.sizes + 1)

    def __len__(self) -> int:
        return len(self.sizes)

    def message(self, i: int) -> memoryview:
        start = int(self.offsets[i])
        return memoryview(self.pool)[start : start + int(self.sizes[i])]


def fuzz_reader(name: str, index: int, stream_args: tuple, poll: bool, results: Queue) -> None:
    """Reads the whole stream as reader `index` and reports ("ok", count) or ("error", what).
    With poll=True it reads with a 1 ms timeout and retries, which resumes messages whose
    read timed out midway."""
    stream = MessageStream(*stream_args)
    with Ring.attach(name, index) as ring:
        for i in range(len(stream)):
            while True:
                try:
                    message = ring.read(timeout=0.001 if poll else TIMEOUT)
                    break
                except TimeoutError:
                    if not poll:
                        raise
            if message != stream.message(i):
                results.put(("error", f"reader {index}: message {i} differs (got {len(message)} bytes, "
                                      f"expected {stream.sizes[i]})"))
                return
        results.put(("ok", len(stream)))


def echo_responder(request_name: str, names: Queue, count: int) -> None:
    """Answers each request on its own response ring (SPSC) with the request reversed."""
    with Ring.attach(request_name, 0) as requests, Ring.create(1, 8, 128) as responses:
        names.put(responses.name)
        responses.wait_attached(timeout=TIMEOUT)
        for _ in range(count):
            responses.write(requests.read(timeout=TIMEOUT)[::-1], timeout=TIMEOUT)


def blocked_reader(name: str, events: Queue, timeout: float | None = TIMEOUT) -> None:
    """Blocks in read() on an empty ring and reports what ended the wait and the monotonic
    time it ended (one clock for every process on Linux, so the test compares it with its
    own)."""
    ring = Ring.attach(name, 0)
    events.put(("ready", os.getpid()))
    try:
        ring.read(timeout=timeout)
        outcome = "message"
    except (RingClosed, PeerDied, TimeoutError, KeyboardInterrupt) as error:
        outcome = type(error).__name__
    events.put((outcome, time.monotonic()))


def blocked_writer(n_slots: int, events: Queue) -> None:
    """Creates a ring, fills it, then blocks in write() until something ends the wait;
    reports the outcome and the monotonic time the wait ended, like blocked_reader."""
    ring = Ring.create(1, n_slots, 64)
    events.put(("name", ring.name))
    ring.wait_attached(timeout=TIMEOUT)
    for _ in range(n_slots):
        ring.write(b"x", timeout=TIMEOUT)
    events.put(("ready", os.getpid()))
    try:
        ring.write(b"x", timeout=TIMEOUT)
        outcome = "written"
    except (RingClosed, PeerDied, TimeoutError) as error:
        outcome = type(error).__name__
    events.put((outcome, time.monotonic()))


def idle_writer(events: Queue) -> None:
    """Creates a ring, writes one message once attached, then idles until killed."""
    ring = Ring.create(1, 4, 64)
    events.put(("name", ring.name))
    ring.wait_attached(timeout=TIMEOUT)
    ring.write(b"hello", timeout=TIMEOUT)
    time.sleep(TIMEOUT)


def idle_reader(name: str, events: Queue) -> None:
    """Attaches, reports ready, then idles until killed."""
    ring = Ring.attach(name, 0)
    events.put(("ready", os.getpid()))
    time.sleep(TIMEOUT)
    ring.close()


def create_and_exit(events: Queue) -> None:
    """Creates a ring nobody attaches to and returns normally."""
    ring = Ring.create(2, 4, 64)
    events.put(("name", ring.name))


def create_rings_until_killed(events: Queue) -> None:
    """Creates 4 MiB rings one after another (each dropped as the next is made), so that
    a kill at a random moment most likely lands inside a create."""
    rings = [Ring.create(1, 64, 64 * 1024)]
    events.put(("creating", os.getpid()))
    while True:
        rings[0] = Ring.create(1, 64, 64 * 1024)


def late_reader(name: str, delay: float, events: Queue) -> None:
    """A reader that is slow to start: attaches after `delay` seconds, then blocked_reader."""
    time.sleep(delay)
    blocked_reader(name, events)


def never_attaching_reader(lifetime: float) -> None:
    """A reader process that dies before it attaches: it exits after `lifetime` seconds,
    unless killed first."""
    time.sleep(lifetime)


def write_then_die(message: bytes, delay: float, events: Queue, go: Connection) -> None:
    """A writer that publishes `message` `delay` seconds after the go signal and then dies
    at once, closing nothing (os._exit runs no destructor)."""
    ring = Ring.create(1, 4, 64)
    events.put(("name", ring.name))
    ring.wait_attached(timeout=TIMEOUT)
    go.recv()
    time.sleep(delay)
    ring.write(message, timeout=TIMEOUT)
    os._exit(0)

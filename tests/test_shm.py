"""The shared-memory rings of shardline._shm: every message arrives once, in order and
intact, across processes and through rings smaller than it, and reads and writes time out
near their timeout, leaving the ring usable. Close is in test_shm_close.py, peer death and
waiting for readers in test_shm_liveness.py, argument checking in test_shm_arguments.py,
segment hygiene in test_shm_hygiene.py."""

from __future__ import annotations

import os
import random
import threading
import time

import pytest
from launcher import SPAWN, join_all, spawn
from shm_helpers import TIMEOUT, MessageStream, echo_responder, fuzz_reader

from shardline._shm import Ring, raw_handoff_latency

SLOT = 256
SLOTS = 64


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


def test_raw_handoff_latency_returns_one_positive_sample_per_message():
    samples = raw_handoff_latency(64, 500)
    assert len(samples) == 500 and all(0 < ns < 10**9 for ns in samples)
    with pytest.raises(ValueError, match="payload_bytes"):
        raw_handoff_latency(4, 10)

import hashlib
import os
import pickle
import signal
import threading
import time

import numpy as np
import pytest
import torch
from launcher import SPAWN, join_all, spawn
from shm_helpers import DATA_WAIT_SLEEPERS, mapped_head, wait_asleep
from queue_children import read_one_then_idle
from wire_values import as_received, assert_identical, random_value

from shardline import _shm
from shardline.ipc import Encoder, MessageQueue, MessageQueueHandle, PeerDied, RingClosed

TIMEOUT = 30.0


def digest(obj: object) -> str:
    """A checksum of the arrays' and tensors' bytes, dtypes and shapes inside `obj`."""
    h = hashlib.sha256()

    def visit(x: object) -> None:
        if isinstance(x, dict):
            for key in sorted(x, key=str):
                h.update(str(key).encode())
                visit(x[key])
        elif isinstance(x, (list, tuple)):
            for item in x:
                visit(item)
        elif isinstance(x, np.ndarray):
            h.update(f"{x.dtype.str}{x.shape}".encode() + np.ascontiguousarray(x).tobytes())
        elif isinstance(x, torch.Tensor):
            raw = x.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
            h.update(f"{x.dtype}{tuple(x.shape)}".encode() + raw)
        else:
            h.update(repr(x).encode())

    visit(obj)
    return h.hexdigest()


def echo_reader(handle: MessageQueueHandle, index: int, handle_pipe) -> None:
    """Reader process: answer every message with its reader index, checksum and the message."""
    requests = MessageQueue.attach(handle, index)
    with requests, MessageQueue.create(1, n_slots=8, slot_size=4096) as responses:
        handle_pipe.send(responses.handle())
        responses.wait_attached(TIMEOUT)
        while (message := requests.dequeue(TIMEOUT)) is not None:
            reply = {"reader": index, "digest": digest(message), "echo": message}
            responses.enqueue(reply, TIMEOUT)


def wait_for_close(handle: MessageQueueHandle, ready_pipe) -> None:
    """Reader process: block in dequeue until the writer closes the queue."""
    with MessageQueue.attach(handle, 0) as requests:
        ready_pipe.send("ready")
        try:
            requests.dequeue(TIMEOUT)
        except RingClosed:
            return
    raise AssertionError("dequeue returned instead of raising RingClosed")


def exit_without_attaching() -> None:
    """Reader process that dies before it attaches."""


def random_message(rng: np.random.Generator, size: int) -> dict:
    return {
        "seq": int(rng.integers(1 << 40)),
        "tokens": rng.integers(0, 32_000, size=int(rng.integers(0, 64))).tolist(),
        "hidden": torch.randn(size // 4 + 1, 3).to(torch.bfloat16),
        "mask": torch.rand(int(rng.integers(1, 9))) < 0.5,
        "positions": torch.arange(int(rng.integers(0, 5)), dtype=torch.int64),
        "blob": rng.integers(0, 256, size=size, dtype=np.uint8),
        "scalar": np.float32(rng.standard_normal()),
        "nested": {
            "empty": np.zeros((0, 4)),
            "strided": rng.standard_normal((6, 8))[::2, ::3],
            "name": "x",
        },
    }


def assert_same(got: object, expected: object) -> None:
    assert digest(got) == digest(expected)
    assert got.keys() == expected.keys()
    for key in ("hidden", "mask", "positions"):
        assert got[key].dtype == expected[key].dtype and torch.equal(got[key], expected[key])
    assert np.array_equal(got["blob"], expected["blob"]) and got["tokens"] == expected["tokens"]


def test_broadcast_to_two_reader_processes_and_replies_back():
    rng = np.random.default_rng()
    # A 4 KiB slot ring of 8 slots: most messages span slots, the 100 KiB one spans the whole ring.
    sizes = [0, 1, 100, 4096, 5000, 32 * 1024, 100 * 1024, *rng.integers(0, 20_000, 8).tolist()]
    messages = [random_message(rng, int(size)) for size in sizes]
    with MessageQueue.create(2, n_slots=8, slot_size=4096) as requests:
        pipes = [SPAWN.Pipe(duplex=False) for _ in range(2)]
        procs = [
            spawn(echo_reader, requests.handle(), index, sender)
            for index, (_, sender) in enumerate(pipes)
        ]
        try:
            responses = []
            for receiver, _ in pipes:
                assert receiver.poll(TIMEOUT), "a reader did not send its response handle"
                responses.append(MessageQueue.attach(receiver.recv(), 0))
            requests.wait_attached(TIMEOUT)
            for message in messages:
                requests.enqueue(message, TIMEOUT)
                for index, response in enumerate(responses):
                    reply = response.dequeue(TIMEOUT)
                    assert reply["reader"] == index and reply["digest"] == digest(message)
                    assert_same(reply["echo"], message)
            requests.enqueue(None, TIMEOUT)
            join_all(procs, TIMEOUT)
        finally:
            join_all(procs, 0)


def test_close_wakes_a_dequeue_blocked_in_another_process():
    requests = MessageQueue.create(1)
    receiver, sender = SPAWN.Pipe(duplex=False)
    with mapped_head(requests.handle().name) as head:
        proc = spawn(wait_for_close, requests.handle(), sender)
        assert receiver.poll(TIMEOUT), "the reader did not start"
        receiver.recv()
        wait_asleep(head, DATA_WAIT_SLEEPERS)
    requests.close()
    join_all([proc], TIMEOUT)


def test_close_wakes_a_dequeue_blocked_in_another_thread():
    with MessageQueue.create(1) as writer, mapped_head(writer.handle().name) as head, \
            MessageQueue.attach(writer.handle(), 0) as reader:
        raised = []

        def wait() -> None:
            try:
                reader.dequeue(TIMEOUT)
            except RingClosed as exc:
                raised.append(exc)

        thread = threading.Thread(target=wait)
        thread.start()
        wait_asleep(head, DATA_WAIT_SLEEPERS)
        writer.close()
        thread.join(TIMEOUT)
        assert not thread.is_alive() and len(raised) == 1


def test_dropping_the_writer_queue_closes_it_for_a_dequeue_in_another_process():
    requests = MessageQueue.create(1)
    receiver, sender = SPAWN.Pipe(duplex=False)
    with mapped_head(requests.handle().name) as head:
        proc = spawn(wait_for_close, requests.handle(), sender)
        assert receiver.poll(TIMEOUT), "the reader did not start"
        receiver.recv()
        wait_asleep(head, DATA_WAIT_SLEEPERS)
    del requests
    # Well inside the reader's 30 s dequeue timeout, yet room for its interpreter's exit
    # (about 1 s with torch loaded, more on a loaded machine).
    join_all([proc], TIMEOUT / 2)


def test_enqueue_before_every_reader_attached_raises():
    with MessageQueue.create(2) as writer, MessageQueue.attach(writer.handle(), 0):
        with pytest.raises(RuntimeError, match=r"1 of 2 readers attached \(missing: 1\).*wait_attached"):
            writer.enqueue({"step": 1})


def test_wait_attached_passes_reader_pids_through():
    with MessageQueue.create(1) as writer:
        proc = spawn(exit_without_attaching)
        join_all([proc], TIMEOUT)
        start = time.monotonic()
        with pytest.raises(PeerDied, match=f"reader process {proc.pid} "):
            writer.wait_attached(TIMEOUT, reader_pids=[proc.pid])
        assert time.monotonic() - start < 1.0
        with pytest.raises(ValueError, match=r"reader_pids\[0\] must be in \[1, "):
            writer.wait_attached(TIMEOUT, reader_pids=[0])
        with pytest.raises(TimeoutError):
            writer.wait_attached(0.05, reader_pids=None)


def test_dequeue_times_out_on_an_empty_queue():
    with MessageQueue.create(1) as writer, MessageQueue.attach(writer.handle(), 0) as reader:
        timeout = 0.05 + float(np.random.default_rng().random()) * 0.1
        start = time.monotonic()
        with pytest.raises(TimeoutError):
            reader.dequeue(timeout)
        assert timeout <= time.monotonic() - start < timeout + 2.0


def test_unsupported_object_raises_type_error_and_sends_nothing():
    class Opaque:
        pass

    with MessageQueue.create(1) as writer, MessageQueue.attach(writer.handle(), 0) as reader:
        with pytest.raises(TypeError, match="Opaque"):
            writer.enqueue({"ok": np.arange(3), "bad": Opaque()})
        if torch.cuda.is_available():
            with pytest.raises(TypeError, match="cuda"):
                writer.enqueue(torch.ones(2, device="cuda"))
        with pytest.raises(TypeError, match="device meta"):
            writer.enqueue(torch.ones(2, device="meta"))
        with pytest.raises(TimeoutError):
            reader.dequeue(0.05)
        value = np.random.default_rng().integers(1 << 62)
        writer.enqueue([value])
        assert reader.dequeue(TIMEOUT) == [value]


def test_tuples_arrive_as_lists_in_order():
    rng = np.random.default_rng()
    objects = [(int(x), ("a", float(x))) for x in rng.integers(0, 1000, size=20)]
    with MessageQueue.create(1) as writer, MessageQueue.attach(writer.handle(), 0) as reader:
        for obj in objects:
            writer.enqueue(obj)
            assert reader.dequeue(TIMEOUT) == [obj[0], list(obj[1])]


def test_handle_is_small_and_picklable_but_the_queue_is_not():
    with MessageQueue.create(3) as writer:
        handle = writer.handle()
        data = pickle.dumps(handle)
        assert len(data) < 256 and pickle.loads(data) == handle and handle.n_readers == 3
        with pytest.raises(TypeError, match="handle"):
            pickle.dumps(writer)


def test_attach_rejects_a_reader_index_out_of_range():
    with MessageQueue.create(2) as writer:
        for index in (-1, 2):
            with pytest.raises(ValueError, match=f"reader_index={index}"):
                MessageQueue.attach(writer.handle(), index)


def test_each_end_does_only_its_own_job():
    with MessageQueue.create(1) as writer, MessageQueue.attach(writer.handle(), 0) as reader:
        assert writer.reader_index == -1 and reader.reader_index == 0
        with pytest.raises(RuntimeError, match="only the writer enqueues"):
            reader.enqueue(1)
        with pytest.raises(RuntimeError, match="only readers dequeue"):
            writer.dequeue(0)


def test_exceptions_are_the_ring_exceptions():
    assert RingClosed is _shm.RingClosed and PeerDied is _shm.PeerDied


def frame_bytes(obj: object) -> int:
    return sum(memoryview(part).nbytes for part in Encoder().encode(obj))


def bytes_framed_in(rng, total: int) -> bytes:
    """Random bytes whose frame (length header + msgpack) is exactly `total` bytes long."""
    for bin_header in (2, 3, 5):
        payload = rng.randbytes(max(0, total - 4 - bin_header))
        if frame_bytes(payload) == total:
            return payload
    raise AssertionError(f"no bytes object frames to {total} bytes")


def read_in_thread(queue: MessageQueue, count: int, pause=None,
                   poll: bool = False) -> tuple[threading.Thread, list]:
    """Starts a thread that dequeues `count` messages into the returned list, calling
    `pause(i)` before message i. With poll=True each dequeue waits 1 ms and is retried
    after its TimeoutError, which resumes a message whose read timed out midway."""
    received: list = []

    def run() -> None:
        for i in range(count):
            if pause is not None:
                pause(i)
            while True:
                try:
                    received.append(queue.dequeue(0.001 if poll else TIMEOUT))
                    break
                except TimeoutError:
                    if not poll:
                        raise

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, received


def joined(thread: threading.Thread) -> None:
    thread.join(TIMEOUT)
    assert not thread.is_alive(), "the reader thread did not finish"


def test_frames_at_the_edges_of_a_slot_and_of_the_ring_arrive_whole(rng):
    slot, n_slots = rng.randint(300, 700), rng.randint(1, 4)
    ring = slot * n_slots
    sizes = [slot - 1, slot, slot + 1, 2 * slot, ring - 1, ring, ring + 1,
             rng.randint(10 * ring, 40 * ring), rng.randint(8, slot)]
    messages = [bytes_framed_in(rng, size) for size in sizes]
    # Arrays put part boundaries (meta, padding, buffer) anywhere within a slot.
    messages += [[np.frombuffer(rng.randbytes(n), np.uint8), rng.randbytes(rng.randrange(9))]
                 for n in (slot - 70, slot, ring - 70, ring, rng.randint(ring, 5 * ring))]
    messages += [random_value(rng) for _ in range(30)]
    rng.shuffle(messages)
    with MessageQueue.create(1, n_slots=n_slots, slot_size=slot) as writer:
        name = writer.handle().name
        with MessageQueue.attach(writer.handle(), 0) as reader:
            assert not os.path.exists("/dev/shm" + name)
            thread, received = read_in_thread(reader, len(messages))
            for message in messages:
                writer.enqueue(message, TIMEOUT)
            joined(thread)
    assert len(received) == len(messages)
    for got, sent in zip(received, messages):
        assert_identical(got, as_received(sent))
    assert not os.path.exists("/dev/shm" + name)


def test_many_small_messages_back_to_back_arrive_in_order(rng):
    messages = [[i, rng.randrange(2**64), "x" * rng.randrange(40), rng.random()]
                for i in range(3000)]
    with MessageQueue.create(1, n_slots=8, slot_size=64) as writer, \
            MessageQueue.attach(writer.handle(), 0) as reader:
        thread, received = read_in_thread(reader, len(messages))
        for message in messages:
            writer.enqueue(message, TIMEOUT)
        joined(thread)
    assert received == messages


def test_a_full_ring_makes_the_writer_wait_and_never_overwrites(rng):
    """With the reader not reading, the writer fills the ring and then times out; the
    reader then gets every message sent before, intact, but not the one that timed out
    (part of it may have been published), and the queue carries the next one."""
    slot, n_slots = 128, rng.randint(2, 6)
    with MessageQueue.create(1, n_slots=n_slots, slot_size=slot) as writer, \
            MessageQueue.attach(writer.handle(), 0) as reader:
        sent = []
        while True:
            message = bytes_framed_in(rng, rng.randint(8, 2 * slot))
            try:
                writer.enqueue(message, timeout=0.02)
            except TimeoutError:
                break
            sent.append(message)
            assert len(sent) <= n_slots, "the writer wrote more slots than the ring holds"
        assert [reader.dequeue(TIMEOUT) for _ in sent] == sent
        with pytest.raises(TimeoutError):
            reader.dequeue(0.02)
        for _ in range(2 * n_slots):  # one slot each: with the timed out one's abort mark
            message = bytes_framed_in(rng, rng.randint(8, slot))
            writer.enqueue(message, TIMEOUT)
            assert reader.dequeue(TIMEOUT) == message


def test_readers_of_different_speeds_each_get_every_message(rng):
    """One broadcast ring, four readers: one at full speed, one slower than the writer,
    one that stalls now and then, one that polls with 1 ms timeouts; messages span slots
    and the whole ring."""
    messages = [[random_value(rng), np.frombuffer(rng.randbytes(rng.randrange(3000)), np.uint8)]
                for _ in range(120)]
    stalls = {i: rng.uniform(0.01, 0.05) for i in rng.sample(range(len(messages)), 4)}
    pauses = [None, lambda i: time.sleep(0.001), lambda i: time.sleep(stalls.get(i, 0))]
    with MessageQueue.create(4, n_slots=4, slot_size=256) as writer:
        readers = [MessageQueue.attach(writer.handle(), i) for i in range(4)]
        writer.wait_attached(TIMEOUT)
        threads = [read_in_thread(reader, len(messages), pause) for reader, pause
                   in zip(readers, pauses)]
        threads.append(read_in_thread(readers[3], len(messages), poll=True))
        for message in messages:
            writer.enqueue(message, TIMEOUT)
        for thread, _ in threads:
            joined(thread)
    for _, received in threads:
        assert len(received) == len(messages)
        for got, sent in zip(received, messages):
            assert_identical(got, as_received(sent))


def test_a_reader_killed_mid_message_ends_the_writers_wait_with_peer_died(rng):
    receiver, sender = SPAWN.Pipe(duplex=False)
    with MessageQueue.create(1, n_slots=4, slot_size=256) as writer:
        name = writer.handle().name
        child = spawn(read_one_then_idle, writer.handle(), sender)
        try:
            writer.wait_attached(TIMEOUT, reader_pids=[child.pid])
            first = random_value(rng)
            writer.enqueue(first, TIMEOUT)
            assert receiver.poll(TIMEOUT) and receiver.recv() == child.pid
            assert_identical(pickle.loads(receiver.recv_bytes()), as_received(first))
            threading.Timer(0.2, os.kill, (child.pid, signal.SIGKILL)).start()
            start = time.monotonic()
            with pytest.raises(PeerDied, match=f"reader 0 \\(pid {child.pid}\\)"):
                writer.enqueue(np.frombuffer(rng.randbytes(40 * 1024), np.uint8), TIMEOUT)
            assert time.monotonic() - start < 5.0
        finally:
            child.kill()
            child.join(TIMEOUT)
    assert not os.path.exists("/dev/shm" + name)

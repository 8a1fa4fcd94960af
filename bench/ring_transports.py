"""The four transports of bench/ring.py, each doing the same broadcast round trip.

The writer broadcasts [seq, send_time_ns, wants_reply, payload] (payload: bytes or a uint8
numpy array) to every reader process; a reader decodes it, reads the clock, and when asked replies
[seq, reader_index, one_way_ns] on its way back. The writer's side of each transport is a
`Transport`; the readers are module-level functions, as spawned children import them by name.
"""

from __future__ import annotations

import importlib.util
import multiprocessing
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Callable

import msgpack
import numpy as np
import zmq

from shardline.ipc import MessageQueue, MessageQueueHandle

STOP = -1
SPAWN = multiprocessing.get_context("spawn")
TIMEOUT_S = 120.0  # any one wait of the writer
READER_TIMEOUT_S = 600.0  # a reader idles this long at most, e.g. while other transports start
# vLLM's queue, sized like shardline's 64 x 64 KiB ring: 1 MiB messages fit one chunk.
VLLM_CHUNK_BYTES = 2 << 20
VLLM_CHUNKS = 4


def serve(recv: Callable[[], list], reply: Callable[[list], object], index: int) -> None:
    """A reader's loop: receive, time, answer when asked, until the STOP message."""
    while True:
        seq, sent_ns, wants_reply, _payload = recv()
        one_way_ns = time.perf_counter_ns() - sent_ns
        if seq == STOP:
            return
        if wants_reply:
            reply([seq, index, one_way_ns])


def shardline_reader(handle: MessageQueueHandle, index: int, handle_pipe) -> None:
    requests = MessageQueue.attach(handle, index)
    with requests, MessageQueue.create(1) as responses:
        handle_pipe.send(responses.handle())
        responses.wait_attached(READER_TIMEOUT_S)
        serve(lambda: requests.dequeue(READER_TIMEOUT_S), responses.enqueue, index)


def queue_reader(requests, responses, index: int) -> None:
    serve(lambda: requests.get(timeout=READER_TIMEOUT_S), responses.put, index)


def pipe_reader(conn, index: int) -> None:
    def recv():
        if not conn.poll(READER_TIMEOUT_S):
            raise TimeoutError(f"reader {index}: no message in {READER_TIMEOUT_S} s")
        return conn.recv()

    serve(recv, conn.send, index)


def zmq_reader(pub_address: str, pull_address: str, index: int) -> None:
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.RCVHWM, 0)
    sub.setsockopt(zmq.RCVTIMEO, int(READER_TIMEOUT_S * 1000))
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(pub_address)
    push = ctx.socket(zmq.PUSH)
    push.connect(pull_address)

    def recv():
        header, payload = sub.recv_multipart(copy=False)
        return [*msgpack.unpackb(header.bytes), np.frombuffer(payload.buffer, np.uint8)]

    serve(recv, lambda answer: push.send(msgpack.packb(answer)), index)
    ctx.destroy(linger=0)


def vllm_reader(handle: object, index: int, handle_pipe) -> None:
    from vllm.distributed.device_communicators.shm_broadcast import MessageQueue as VllmQueue

    requests = VllmQueue.create_from_handle(handle, index)
    responses = VllmQueue(1, 1, max_chunk_bytes=VLLM_CHUNK_BYTES, max_chunks=VLLM_CHUNKS)
    handle_pipe.send(responses.export_handle())
    requests.wait_until_ready()
    responses.wait_until_ready()
    serve(lambda: requests.dequeue(timeout=READER_TIMEOUT_S), responses.enqueue, index)


class Transport(ABC):
    """The writer's side of one transport with `n_readers` reader processes."""

    name: str

    def __init__(self, n_readers: int) -> None:
        self.n_readers = n_readers
        self.procs: list[multiprocessing.process.BaseProcess] = []
        self.seq = 0  # of the last message broadcast

    @abstractmethod
    def broadcast(self, message: list) -> None:
        """Send `message` to every reader."""

    @abstractmethod
    def next_reply(self) -> list:
        """The next reply of any reader."""

    def gather(self, seq: int) -> list[int]:
        """One-way latencies of message `seq`, one per reader; older replies are dropped."""
        latencies = []
        while len(latencies) < self.n_readers:
            reply_seq, _reader, one_way_ns = self.next_reply()
            if reply_seq == seq:
                latencies.append(one_way_ns)
        return latencies

    def stop(self) -> None:
        """Tell every reader to exit, wait for them (killing stragglers), release the channels."""
        self.broadcast([STOP, time.perf_counter_ns(), False, np.empty(0, np.uint8)])
        for proc in self.procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
        self.close()

    def close(self) -> None:
        """Release the writer's channels."""

    def spawn(self, target: Callable[..., None], *args: object) -> None:
        proc = SPAWN.Process(target=target, args=args, daemon=True)
        proc.start()
        self.procs.append(proc)


class ShardlineTransport(Transport):
    name = "shardline"

    def __init__(self, n_readers: int) -> None:
        super().__init__(n_readers)
        self.requests = MessageQueue.create(n_readers, n_slots=64, slot_size=64 * 1024)
        pipes = [SPAWN.Pipe(duplex=False) for _ in range(n_readers)]
        for index, (_, sender) in enumerate(pipes):
            self.spawn(shardline_reader, self.requests.handle(), index, sender)
        self.responses = []
        for receiver, _ in pipes:
            if not receiver.poll(TIMEOUT_S):
                raise TimeoutError(f"no response-queue handle from a reader in {TIMEOUT_S} s")
            self.responses.append(MessageQueue.attach(receiver.recv(), 0))
        self.requests.wait_attached(TIMEOUT_S)
        self.next_reader = 0

    def broadcast(self, message: list) -> None:
        self.requests.enqueue(message, TIMEOUT_S)

    def next_reply(self) -> list:
        reply = self.responses[self.next_reader].dequeue(TIMEOUT_S)
        self.next_reader = (self.next_reader + 1) % self.n_readers
        return reply

    def close(self) -> None:
        for queue in [self.requests, *self.responses]:
            queue.close()


class QueueTransport(Transport):
    name = "mp.Queue"

    def __init__(self, n_readers: int) -> None:
        super().__init__(n_readers)
        self.requests = [SPAWN.Queue() for _ in range(n_readers)]
        self.responses = SPAWN.Queue()
        for index, queue in enumerate(self.requests):
            self.spawn(queue_reader, queue, self.responses, index)

    def broadcast(self, message: list) -> None:
        for queue in self.requests:
            queue.put(message)

    def next_reply(self) -> list:
        return self.responses.get(timeout=TIMEOUT_S)


class PipeTransport(Transport):
    name = "mp.Pipe"

    def __init__(self, n_readers: int) -> None:
        super().__init__(n_readers)
        self.conns = []
        for index in range(n_readers):
            mine, theirs = SPAWN.Pipe()
            self.spawn(pipe_reader, theirs, index)
            self.conns.append(mine)
        self.next_reader = 0

    def broadcast(self, message: list) -> None:
        for conn in self.conns:
            conn.send(message)

    def next_reply(self) -> list:
        conn = self.conns[self.next_reader]
        self.next_reader = (self.next_reader + 1) % self.n_readers
        if not conn.poll(TIMEOUT_S):
            raise TimeoutError(f"no reply from a Pipe reader in {TIMEOUT_S} s")
        return conn.recv()


class ZmqTransport(Transport):
    name = "pyzmq"

    def __init__(self, n_readers: int) -> None:
        super().__init__(n_readers)
        self.dir = tempfile.TemporaryDirectory(prefix="shardline-bench-")
        pub_address, pull_address = f"ipc://{self.dir.name}/pub", f"ipc://{self.dir.name}/pull"
        self.ctx = zmq.Context()
        self.pub = self.ctx.socket(zmq.PUB)
        self.pub.setsockopt(zmq.SNDHWM, 0)
        self.pub.bind(pub_address)
        self.pull = self.ctx.socket(zmq.PULL)
        self.pull.bind(pull_address)
        for index in range(n_readers):
            self.spawn(zmq_reader, pub_address, pull_address, index)
        self.subscribe_all()

    def subscribe_all(self) -> None:
        """Ping until every subscriber answered: PUB drops messages sent before a SUB joins."""
        answered, deadline = set(), time.monotonic() + TIMEOUT_S
        while len(answered) < self.n_readers:
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {len(answered)} of {self.n_readers} zmq readers joined")
            self.broadcast([0, time.perf_counter_ns(), True, np.empty(0, np.uint8)])
            while self.pull.poll(20):
                answered.add(msgpack.unpackb(self.pull.recv())[1])

    def broadcast(self, message: list) -> None:
        *header, payload = message
        self.pub.send_multipart([msgpack.packb(header), payload], copy=len(payload) < 65536)

    def next_reply(self) -> list:
        if not self.pull.poll(TIMEOUT_S * 1000):
            raise TimeoutError(f"no reply from a zmq reader in {TIMEOUT_S} s")
        return msgpack.unpackb(self.pull.recv())

    def close(self) -> None:
        self.ctx.destroy(linger=0)
        self.dir.cleanup()


class VllmTransport(Transport):
    """vLLM's shared-memory MessageQueue (pickle, ring of chunks), when vllm is importable."""

    name = "vllm-shm"

    def __init__(self, n_readers: int) -> None:
        from vllm.distributed.device_communicators.shm_broadcast import MessageQueue as VllmQueue

        super().__init__(n_readers)
        self.requests = VllmQueue(
            n_readers, n_readers, max_chunk_bytes=VLLM_CHUNK_BYTES, max_chunks=VLLM_CHUNKS
        )
        pipes = [SPAWN.Pipe(duplex=False) for _ in range(n_readers)]
        for index, (_, sender) in enumerate(pipes):
            self.spawn(vllm_reader, self.requests.export_handle(), index, sender)
        self.responses = []
        for receiver, _ in pipes:
            if not receiver.poll(TIMEOUT_S):
                raise TimeoutError(f"no response-queue handle from a vLLM reader in {TIMEOUT_S} s")
            self.responses.append(VllmQueue.create_from_handle(receiver.recv(), 0))
        self.requests.wait_until_ready()
        for queue in self.responses:
            queue.wait_until_ready()
        self.next_reader = 0

    def broadcast(self, message: list) -> None:
        self.requests.enqueue(message, timeout=TIMEOUT_S)

    def next_reply(self) -> list:
        reply = self.responses[self.next_reader].dequeue(timeout=TIMEOUT_S)
        self.next_reader = (self.next_reader + 1) % self.n_readers
        return reply


TRANSPORTS = [ShardlineTransport, QueueTransport, PipeTransport, ZmqTransport]
if importlib.util.find_spec("vllm") is not None:
    TRANSPORTS.append(VllmTransport)

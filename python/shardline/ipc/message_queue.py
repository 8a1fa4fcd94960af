"""MessageQueue: Python objects over a shared-memory broadcast ring.

One writer process broadcasts every message to `n_readers` reader processes; each reader
receives every message once, in order. With `n_readers=1` it is the response path back
from one worker. Objects are encoded by `serializer` (msgpack plus raw array buffers, no
pickle), so numpy arrays and CPU tensors cross without being pickled or copied into an
intermediate buffer.
"""

from __future__ import annotations

from dataclasses import dataclass

from shardline import _shm
from shardline.ipc.serializer import Decoder, Encoder

DEFAULT_N_SLOTS = 64
DEFAULT_SLOT_SIZE = 64 * 1024


@dataclass(frozen=True)
class MessageQueueHandle:
    """What another process needs to attach to a queue: small and picklable."""

    name: str
    n_readers: int


class MessageQueue:
    """A broadcast queue of Python objects: one writer, `n_readers` readers.

    Build it with `create` (the writer) and `attach` (each reader, from the writer's
    `handle()`). Messages larger than a slot, or than the whole ring, are legal.
    Blocking calls take a timeout in seconds (None waits forever) and raise TimeoutError
    when it expires, RingClosed once the queue is closed, and PeerDied when the process
    on the other side died. Each end is used by one thread at a time.
    """

    def __init__(self, ring: _shm.Ring) -> None:
        is_writer = ring.reader_index == -1
        self._ring = ring
        self._encoder = Encoder() if is_writer else None
        self._decoder = None if is_writer else Decoder()

    @classmethod
    def create(
        cls, n_readers: int, *, n_slots: int = DEFAULT_N_SLOTS, slot_size: int = DEFAULT_SLOT_SIZE
    ) -> MessageQueue:
        """A new queue with this process as its writer."""
        return cls(_shm.Ring.create(n_readers, n_slots, slot_size))

    @classmethod
    def attach(cls, handle: MessageQueueHandle, reader_index: int) -> MessageQueue:
        """Join the queue of `handle` as reader `reader_index` (0 <= index < n_readers)."""
        if not 0 <= reader_index < handle.n_readers:
            raise ValueError(
                f"reader_index={reader_index} is out of range: the queue {handle.name!r} "
                f"has readers 0 to {handle.n_readers - 1}"
            )
        return cls(_shm.Ring.attach(handle.name, reader_index))

    def handle(self) -> MessageQueueHandle:
        """The handle readers pass to `attach`."""
        return MessageQueueHandle(self._ring.name, self._ring.n_readers)

    @property
    def n_readers(self) -> int:
        return self._ring.n_readers

    @property
    def reader_index(self) -> int:
        """This end's reader index, or -1 for the writer."""
        return self._ring.reader_index

    def wait_attached(self, timeout: float | None = None) -> None:
        """Writer: block until every reader has attached."""
        self._ring.wait_attached(timeout)

    def enqueue(self, obj: object, timeout: float | None = None) -> None:
        """Writer: broadcast `obj` to every reader.

        Blocks while the ring is full. Raises TypeError, before anything is sent, if `obj`
        holds a type the serializer does not support (see serializer.SUPPORTED_TYPES).
        """
        if self._encoder is None:
            raise RuntimeError(
                f"enqueue on reader {self._ring.reader_index} of queue {self._ring.name!r}: "
                "only the writer enqueues"
            )
        self._ring.write_parts(self._encoder.encode(obj), timeout)

    def dequeue(self, timeout: float | None = None) -> object:
        """Reader: the next object. Tuples arrive as lists (see serializer).

        Arrays and tensors in it share one fresh buffer per message and are writable.
        """
        if self._decoder is None:
            raise RuntimeError(
                f"dequeue on the writer of queue {self._ring.name!r}: only readers dequeue"
            )
        return self._decoder.decode(self._ring.read(timeout))

    def close(self) -> None:
        """Close the queue for every end: waiters here and in the peer processes wake and
        raise RingClosed, as does any later call."""
        self._ring.close()

    def __reduce__(self) -> tuple:
        raise TypeError(
            "a MessageQueue cannot be pickled: send its handle() to the other process and "
            "call MessageQueue.attach(handle, reader_index) there"
        )

    def __enter__(self) -> MessageQueue:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

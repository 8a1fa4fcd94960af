"""MessageQueue: Python objects over a shared-memory broadcast ring.

One writer process broadcasts every message to `n_readers` reader processes; each reader
receives every message once, in order. With `n_readers=1` it is the response path back
from one worker. Objects are encoded by `serializer` (msgpack plus raw array buffers, no
pickle), so numpy arrays and CPU tensors cross without being pickled or copied into an
intermediate buffer.

A queue's shared memory has a name in /dev/shm only until every reader has attached (or
the writer closes it or exits). A writer killed before that cannot remove the name; the
next queue or ring created on the machine, by any process of the same user, removes it,
as does `shardline._shm.sweep_orphans()`, which a launcher can call at startup. So a
crash leaks nothing in /dev/shm past the next create.
"""

from __future__ import annotations

from dataclasses import dataclass

from shardline import _shm
from shardline.ipc.frame_checks import FrameError
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
    `handle()`); the writer calls `wait_attached` before its first `enqueue`. Messages
    larger than a slot, or than the whole ring, are legal. Blocking calls take a timeout
    in seconds (None waits forever) and raise TimeoutError when it expires, RingClosed
    once the queue is closed, and PeerDied when the process on the other side died; a
    reader receives every message enqueued before the close or the death first. Each end
    is used by one thread at a time. Dropping an end closes the queue, as `close` does.
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
        """A new queue with this process as its writer. Also removes the segments that
        writers killed before their readers attached left in /dev/shm."""
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

    def wait_attached(
        self, timeout: float | None = None, reader_pids: list[int] | tuple[int, ...] | None = None
    ) -> None:
        """Writer: block until every reader has attached.

        `reader_pids`, a list or tuple of the pids expected to attach (e.g. the workers this
        process spawned, each once), makes the wait raise PeerDied naming the pid soon after
        one of them dies before every reader is in; without it only the timeout ends the wait.
        """
        self._ring.wait_attached(timeout, reader_pids)

    def enqueue(self, obj: object, timeout: float | None = None) -> None:
        """Writer: broadcast `obj` to every reader.

        Blocks while the ring is full. Raises TypeError, before anything is sent, if `obj`
        holds a type the serializer does not support (see serializer.SUPPORTED_TYPES), and
        RuntimeError until every reader has attached (see `wait_attached`): a reader that
        died before attaching would otherwise leave this call waiting forever.
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
        Raises FrameError (a ValueError) when the message read is not a frame an Encoder
        made (corrupt shared memory), after which the queue stays usable for the next
        message; also when the ring itself is corrupted (a slot header no writer wrote),
        after which it is not.
        """
        if self._decoder is None:
            raise RuntimeError(
                f"dequeue on the writer of queue {self._ring.name!r}: only readers dequeue"
            )
        try:
            frame = self._ring.read(timeout)
        except _shm.RingCorrupted as exc:
            raise FrameError(str(exc)) from exc
        return self._decoder.decode(frame)

    def close(self) -> None:
        """Close the queue for every end: waiters here and in the peer processes wake and,
        once they have received what was enqueued before, raise RingClosed, as does any
        later call. Dropping the queue closes it too (in the process that made the end)."""
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

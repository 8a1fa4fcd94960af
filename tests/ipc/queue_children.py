"""Child-process bodies for tests/ipc/test_message_queue.py that import neither torch nor
the test module, so that a spawned child starts in a fraction of a second."""

from __future__ import annotations

import os
import time
from multiprocessing.connection import Connection
from multiprocessing.reduction import ForkingPickler

from shardline.ipc import MessageQueue, MessageQueueHandle


def read_one_then_idle(handle: MessageQueueHandle, pipe: Connection) -> None:
    """Reader 0: reports its pid, passes the first message back, then reads no more
    until it is killed. The message goes back as the pipe would send it but with pickle
    protocol 5: the pipe's own (4) turns numpy's non-native byte order native, and plain
    pickle cannot rebuild float8 tensors."""
    queue = MessageQueue.attach(handle, 0)
    pipe.send(os.getpid())
    pipe.send_bytes(ForkingPickler.dumps(queue.dequeue(30.0), protocol=5))
    time.sleep(60.0)

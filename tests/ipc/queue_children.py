"""Child-process bodies for tests/ipc/test_message_queue.py that import neither torch nor
the test module, so that a spawned child starts in a fraction of a second."""

from __future__ import annotations

import os
import pickle
import time
from multiprocessing.connection import Connection

from shardline.ipc import MessageQueue, MessageQueueHandle


def read_one_then_idle(handle: MessageQueueHandle, pipe: Connection) -> None:
    """Reader 0: reports its pid, passes the first message back, then reads no more
    until it is killed. The message goes back pickled with protocol 5: the pipe's own
    protocol turns numpy's big-endian arrays native."""
    queue = MessageQueue.attach(handle, 0)
    pipe.send(os.getpid())
    pipe.send_bytes(pickle.dumps(queue.dequeue(30.0), protocol=5))
    time.sleep(60.0)

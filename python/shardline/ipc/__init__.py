"""Inter-process messaging over the shared-memory rings of `shardline._shm`."""

from shardline._shm import PeerDied, RingClosed, sweep_orphans
from shardline.ipc.message_queue import MessageQueue, MessageQueueHandle
from shardline.ipc.serializer import Decoder, Encoder

__all__ = ["Decoder", "Encoder", "MessageQueue", "MessageQueueHandle", "PeerDied", "RingClosed",
           "sweep_orphans"]

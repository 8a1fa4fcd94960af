"""Inter-process messaging over the shared-memory rings of `shardline._shm`."""

from shardline._shm import PeerDied, RingClosed, sweep_orphans
from shardline.ipc.message_queue import MessageQueue, MessageQueueHandle
from shardline.ipc.serializer import Decoder, Encoder, FrameError

__all__ = ["Decoder", "Encoder", "FrameError", "MessageQueue", "MessageQueueHandle", "PeerDied",
           "RingClosed", "sweep_orphans"]

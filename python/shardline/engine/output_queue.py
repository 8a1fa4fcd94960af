"""OutputQueue: a stream's outputs for one consumer, bounded however slowly it reads.

AsyncLLM and the server's streams put each step's cumulative RequestOutput here. Each
holds its completions' text so far, so a consumer that stopped reading, with one output
queued per step, held memory that grew with the square of the length (10.6 MB for 64
completions of 480 one-byte tokens).
"""

from __future__ import annotations

import asyncio

from shardline.engine.outputs import RequestOutput

# Outputs a stream keeps for a consumer that has not read them.
MAX_UNREAD = 16


class OutputQueue:
    """Items for one consumer, in order: the cumulative outputs of one or more sources
    (told apart by a key) and other items (an end marker, an exception). Once `limit`
    outputs of a source wait unread, its next output replaces the newest of them rather
    than queuing behind it: outputs are cumulative, so the consumer loses no tokens, only
    the steps between (a chunk then carries several steps' tokens). A consumer that keeps
    up sees every output."""

    def __init__(self, limit: int = MAX_UNREAD) -> None:
        self._limit = limit
        self._queue: asyncio.Queue[tuple[object, list, bool]] = asyncio.Queue()
        self._unread: dict[object, int] = {}
        self._newest: dict[object, list] = {}  # each source's newest unread output, boxed

    def put(self, key: object, item: object) -> None:
        """Queue `item` from source `key`; call it on the consumer's event loop."""
        if not isinstance(item, RequestOutput):
            self._newest.pop(key, None)
            self._queue.put_nowait((key, [item], False))
            return
        box = self._newest.get(key)
        if box is not None and self._unread[key] >= self._limit:
            box[0] = item
            return
        box = self._newest[key] = [item]
        self._unread[key] = self._unread.get(key, 0) + 1
        self._queue.put_nowait((key, box, True))

    async def get(self) -> tuple[object, object]:
        """(key, item) of the next item, waiting for one."""
        key, box, is_output = await self._queue.get()
        if is_output:
            self._unread[key] -= 1
            if self._newest.get(key) is box:
                del self._newest[key]
        return key, box[0]

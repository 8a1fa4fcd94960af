"""The messages between AsyncLLM's callers and its engine thread: each `generate` call's
stream, and the commands posted to the engine thread (add, abort, call), applied in order
between steps. See engine.async_llm for the protocol."""

from __future__ import annotations

import asyncio
from typing import Callable

from shardline.engine.data_parallel import DataParallelEngine
from shardline.engine.llm_engine import LLMEngine
from shardline.engine.output_queue import OutputQueue
from shardline.engine.prompts import PromptType
from shardline.sampling_params import SamplingParams

ACK = object()  # the engine thread's reply to an abort
Item = object  # what a stream's queue holds: a RequestOutput, an exception to raise, or ACK


class Stream:
    """One `generate` call (or one `abort` waiting for its answer): its request id and
    where the engine thread's items for it go."""

    __slots__ = ("request_id", "loop", "queue")

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self.loop = asyncio.get_running_loop()
        self.queue = OutputQueue()


class Add:
    """Add a stream's request, its prompt already validated and tokenized."""

    __slots__ = ("stream", "prompt", "prompt_token_ids", "params")

    def __init__(self, stream: Stream, prompt: PromptType, prompt_token_ids: list[int],
                 params: SamplingParams) -> None:
        self.stream = stream
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        self.params = params


class Abort:
    """Abort `request_id`; with an `owner`, only while the owner's request holds the id.

    The engine thread answers ACK to the `waiter` once the abort is applied (or moot).
    """

    __slots__ = ("request_id", "owner", "waiter")

    def __init__(self, request_id: str, owner: Stream | None, waiter: Stream | None) -> None:
        self.request_id = request_id
        self.owner = owner
        self.waiter = waiter


class Call:
    """Run `fn(engine)` on the engine thread between steps; the engine thread answers the
    `waiter` with a Result (or the exception raised), or ACK if it ends first."""

    __slots__ = ("fn", "waiter")

    def __init__(self, fn: Callable[[LLMEngine | DataParallelEngine], object],
                 waiter: Stream) -> None:
        self.fn = fn
        self.waiter = waiter


class Result:
    __slots__ = ("value",)

    def __init__(self, value: object) -> None:
        self.value = value


Command = Add | Abort | Call

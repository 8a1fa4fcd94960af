"""AsyncLLM: streaming generation for serving stacks.

Each `generate` call registers a request and yields its cumulative RequestOutput every time
it gains tokens, ending with the finished one. One background task steps the engine while
any request is unfinished. Each step runs in a worker thread, so the event loop stays free
for other coroutines; an asyncio lock keeps request additions and aborts between steps.
Cancelling the consumer (or breaking out of the loop) aborts the request and frees its KV
blocks. If a step fails, every open stream raises the error and the engine refuses new
requests, since its state can no longer be trusted.
"""

from __future__ import annotations

import asyncio
from typing import AsyncIterator

from shardline.engine.engine_args import EngineArgs
from shardline.engine.llm_engine import LLMEngine, PromptType
from shardline.engine.outputs import RequestOutput
from shardline.sampling_params import SamplingParams


class AsyncLLM:
    """An engine plus a background step loop that feeds per-request output queues.

    Keyword options are EngineArgs fields.
    """

    def __init__(self, model: str, **kwargs) -> None:
        self.engine = LLMEngine.from_config(EngineArgs(model, **kwargs).to_config())
        self._queues: dict[str, asyncio.Queue[RequestOutput | BaseException]] = {}
        self._loop_task: asyncio.Task | None = None
        self._lock = asyncio.Lock()
        self._failure: BaseException | None = None

    @classmethod
    def from_engine(cls, engine: LLMEngine) -> "AsyncLLM":
        llm = cls.__new__(cls)
        llm.engine = engine
        llm._queues = {}
        llm._loop_task = None
        llm._lock = asyncio.Lock()
        llm._failure = None
        return llm

    async def generate(self, prompt: PromptType, sampling_params: SamplingParams | None,
                       request_id: str) -> AsyncIterator[RequestOutput]:
        """Yield the request's outputs as they grow; raises ValueError for a bad request."""
        if self._failure is not None:
            raise RuntimeError("the engine failed in an earlier step and accepts no more "
                               "requests") from self._failure
        async with self._lock:
            self.engine.add_request(request_id, prompt, sampling_params)
        queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self._queues[request_id] = queue
        self._ensure_loop()
        finished = False
        try:
            while not finished:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
        finally:
            if self._queues.get(request_id) is queue:
                del self._queues[request_id]
            if not finished:
                async with self._lock:
                    self.engine.abort_request(request_id)

    async def abort(self, request_id: str) -> None:
        """Stop a request; its stream ends with the aborted output."""
        async with self._lock:
            output = self.engine.abort_request(request_id)
        queue = self._queues.get(request_id)
        if output is not None and queue is not None:
            queue.put_nowait(output)

    def shutdown(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
        self.engine.shutdown()

    def _ensure_loop(self) -> None:
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.get_running_loop().create_task(self._step_loop())

    async def _step_loop(self) -> None:
        try:
            while self.engine.has_unfinished_requests():
                async with self._lock:
                    outputs = await asyncio.to_thread(self.engine.step)
                for output in outputs:
                    queue = self._queues.get(output.request_id)
                    if queue is not None:
                        queue.put_nowait(output)
        except Exception as exc:
            self._failure = exc
            for queue in self._queues.values():
                queue.put_nowait(exc)

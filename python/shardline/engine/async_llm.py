"""AsyncLLM: streaming generation for serving stacks.

Each `generate` call registers a request and yields its cumulative RequestOutput every time
it gains tokens, ending with the finished one. One background task steps the engine while
any request is unfinished; it runs each step in the event loop's thread, so requests are
added and aborted only between steps. Cancelling the consumer (or breaking out of the
loop) aborts the request and frees its KV blocks.
"""

from __future__ import annotations

import asyncio
from typing import AsyncIterator

from shardline.engine.engine_args import EngineArgs
from shardline.engine.llm_engine import LLMEngine, PromptType
from shardline.engine.outputs import RequestOutput
from shardline.engine.sampling_params import SamplingParams


class AsyncLLM:
    """An engine plus a background step loop that feeds per-request output queues.

    Keyword options are EngineArgs fields.
    """

    def __init__(self, model: str, **kwargs) -> None:
        self.engine = LLMEngine.from_config(EngineArgs(model, **kwargs).to_config())
        self._queues: dict[str, asyncio.Queue[RequestOutput | BaseException]] = {}
        self._loop_task: asyncio.Task | None = None

    @classmethod
    def from_engine(cls, engine: LLMEngine) -> "AsyncLLM":
        llm = cls.__new__(cls)
        llm.engine = engine
        llm._queues = {}
        llm._loop_task = None
        return llm

    async def generate(self, prompt: PromptType, sampling_params: SamplingParams | None,
                       request_id: str) -> AsyncIterator[RequestOutput]:
        """Yield the request's outputs as they grow; raises ValueError for a bad request."""
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
            self._queues.pop(request_id, None)
            if not finished:
                self.engine.abort_request(request_id)

    async def abort(self, request_id: str) -> None:
        """Stop a request; its stream ends with the aborted output."""
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
                for output in self.engine.step():
                    queue = self._queues.get(output.request_id)
                    if queue is not None:
                        queue.put_nowait(output)
                await asyncio.sleep(0)
        except Exception as exc:
            for queue in self._queues.values():
                queue.put_nowait(exc)

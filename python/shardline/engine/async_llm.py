"""AsyncLLM: streaming generation for serving stacks.

Each `generate` call registers a request and yields its cumulative RequestOutput every time
it gains tokens, ending with the finished one. A consumer that falls MAX_UNREAD outputs
behind gets the newest in place of the last it has not read (see engine.output_queue), so
that a stalled one holds a bounded number of outputs, not one per step. One engine thread
owns the engine: it applies the requests and aborts posted to it, in order, between steps,
runs the steps, and hands each output to its stream's event loop; it runs while there is
work and ends when idle. The event loop therefore never waits for a step, and no asyncio
object is shared between streams, so streams may come from any event loop, one after
another (successive `asyncio.run` calls) or at once (loops in several threads).

A request is identified by its stream, not only by its id: closing or cancelling a stream
aborts its own request, never a later request that reused the id after the first finished.
The abort is posted without waiting, then the stream waits for the engine thread to apply
it (at most one step), so a cancelled consumer ends with its KV blocks free; a second cancel
cuts only that wait short, never the abort.

If a step fails (or adding a request fails other than as a bad request), the engine's
state can no longer be trusted: every open stream raises EngineDeadError, with the error as
its cause, and the engine refuses new requests with EngineDeadError. `shutdown` ends open
streams with EngineDeadError as well, so a supervisor that restarts a dead engine catches
that one error, and a ValueError always means a bad request of the stream's own.
"""

from __future__ import annotations

import asyncio
import atexit
import functools
import logging
import os
import threading
import weakref
from typing import Any, AsyncGenerator, Callable

from shardline.engine.async_commands import (ACK, Abort, Add, Call, Command, Item, Result,
                                             Stream)
from shardline.engine.data_parallel import DataParallelEngine, create_engine
from shardline.engine.engine_args import EngineArgs
from shardline.engine.failures import engine_dead, in_forked_child
from shardline.engine.llm_engine import LLMEngine
from shardline.engine.prompts import PromptType
from shardline.engine.metrics import engine_metrics, stopped_engine_metrics
from shardline.engine.outputs import RequestOutput
from shardline.executor.base import EngineDeadError
from shardline.sampling_params import SamplingParams

logger = logging.getLogger("shardline")

EXIT_WAIT_S = 30.0  # at exit, the most an engine thread gets to finish its step


class AsyncLLM:
    """An engine plus the thread that steps it and feeds per-request output streams.

    Keyword options are EngineArgs fields.
    """

    def __init__(self, model: str | os.PathLike[str], **kwargs) -> None:
        args = EngineArgs.from_options("AsyncLLM", model, kwargs)
        self._attach(create_engine(args.to_config()))

    @classmethod
    def from_engine(cls, engine: LLMEngine | DataParallelEngine) -> "AsyncLLM":
        """An AsyncLLM over an engine built elsewhere (the server builds one this way)."""
        llm = cls.__new__(cls)
        llm._attach(engine)
        return llm

    def _attach(self, engine: LLMEngine | DataParallelEngine) -> None:
        self.engine = engine
        self._built_by = os.getpid()
        # Guards the fields below; held only for moments, never across a step.
        self._mutex = threading.Lock()
        self._commands: list[Command] = []
        self._worker: threading.Thread | None = None
        self._failure: BaseException | None = None
        self._failed_when = ""  # "in an earlier step" or "when a worker died"
        self._closed = False
        # The stream of every request the engine runs; touched only by the engine thread
        # (or by shutdown once that thread has ended).
        self._streams: dict[str, Stream] = {}
        # The engine thread is a daemon, so exit never waits for it; but one still in a
        # step when the interpreter finalizes aborts the process ("terminate called
        # without an active exception": torch, freeing a tensor, gives up the GIL, and
        # taking it back ends the thread from inside C++). At exit it stops after its step.
        self._exit_hook = functools.partial(_stop_at_exit, weakref.ref(self))
        atexit.register(self._exit_hook)
        for core in getattr(engine, "cores", [engine]):
            executor = getattr(core, "executor", None)  # a stand-in engine may have none
            add_death_callback = getattr(executor, "add_death_callback", None)
            if add_death_callback is not None:
                add_death_callback(_on_worker_death(weakref.ref(self)))

    async def generate(self, prompt: PromptType, sampling_params: SamplingParams | None,
                       request_id: str, prompt_token_ids: list[int] | None = None
                       ) -> AsyncGenerator[RequestOutput, None]:
        """Yield the request's outputs as they grow (see OutputQueue for a consumer that
        falls behind); raises ValueError for a bad request, EngineDeadError once the engine
        has stopped (failed or shut down). `prompt` is a string, a token-id list, or vLLM's
        TextPrompt `{"prompt": text}` / TokensPrompt `{"prompt_token_ids": ids}` (see
        LLM.generate).

        Leaving the loop early (break, cancel, `aclose`) aborts the request and frees its KV
        blocks: at once with `aclose` (`contextlib.aclosing`); after a plain break, once the
        event loop finalizes the abandoned stream. The id is free again once the request
        finishes, even if its stream has not read the last output yet. `prompt_token_ids`,
        when given, are the prompt's tokens, as `engine.encode_prompt(prompt,
        sampling_params)` returns them (a server calls that off the event loop): the prompt
        is then not tokenized again, and the ids are checked on the engine thread, where a
        bad one fails this stream alone with ValueError.
        """
        self._raise_if_stopped()
        if not isinstance(request_id, str):
            raise ValueError(f"request_id={request_id!r} ({type(request_id).__name__}) is not "
                             "a string")
        params = SamplingParams() if sampling_params is None else sampling_params
        if prompt_token_ids is None:
            _, prompt_token_ids = self.engine.encode_prompt(prompt, params)
        stream = Stream(request_id)
        self._post(Add(stream, prompt, prompt_token_ids, params), refuse=True)
        finished = False
        try:
            while not finished:
                _, item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
        finally:
            if not finished:
                posted = self._post(Abort(request_id, stream, stream), refuse=False)
                # Only the stream's own loop can receive the answer: a stream closed from
                # another loop (its own closed first) does not wait for it.
                if posted and stream.loop is asyncio.get_running_loop():
                    await _acknowledged(stream)

    async def abort(self, request_id: str) -> None:
        """Stop a request and free its KV blocks; returns once that is done.

        Its stream ends with the aborted output (or with its finished one, if the request
        finished first). An unknown id is ignored.
        """
        waiter = Stream(request_id)
        if self._post(Abort(request_id, None, waiter), refuse=False):
            await _acknowledged(waiter)

    async def metrics(self) -> dict[str, Any]:
        """The engine's metrics as a plain dict (see engine.metrics.engine_metrics), read by
        the engine thread between steps. Once the engine has stopped (failed or shut down)
        they are read here, without the per-rank step times, and count no request running
        or waiting and no KV block in use: each request has ended, its stream with the
        error, and the KV cache went with the engine."""
        forked = in_forked_child("AsyncLLM", self._built_by)
        if forked is not None:
            raise forked
        waiter = Stream("metrics")
        if self._post(Call(engine_metrics, waiter), refuse=False):
            _, item = await waiter.queue.get()
            if isinstance(item, BaseException):
                raise item
            if isinstance(item, Result):
                return item.value
        return stopped_engine_metrics(self.engine)

    def shutdown(self) -> None:
        """Stop the engine thread after its current step, end open streams with an error,
        and shut the executor down. In a fork of the process that built the AsyncLLM it
        only closes this copy: the engine thread, the streams and the workers are the
        parent's."""
        if in_forked_child("AsyncLLM", self._built_by) is not None:
            self._closed = True
            return
        atexit.unregister(self._exit_hook)
        worker = self._close()
        if worker is not None:
            worker.join()
        with self._mutex:
            commands, self._commands = self._commands, []
        self._end_streams(EngineDeadError("the AsyncLLM was shut down"), commands)
        self.engine.shutdown()

    def _close(self) -> threading.Thread | None:
        """Refuse new work; the engine thread, if one runs, ends after its current step."""
        with self._mutex:
            self._closed = True
            return self._worker

    def check_health(self) -> None:
        """Raise EngineDeadError, saying why, if the engine accepts no more requests (it
        failed or was shut down)."""
        self._raise_if_stopped()

    def _raise_if_stopped(self) -> None:
        forked = in_forked_child("AsyncLLM", self._built_by)
        if forked is not None:
            raise forked
        if self._failure is not None:
            failure = self._failure
            raise EngineDeadError(f"the engine failed {self._failed_when} and accepts no more "
                                  f"requests: {type(failure).__name__}: {failure}") from failure
        if self._closed:
            raise EngineDeadError("the AsyncLLM was shut down and accepts no more requests")

    def _post(self, command: Command, refuse: bool) -> bool:
        """Queue a command for the engine thread, starting that thread if it is idle.

        Once the engine failed or was shut down, an add raises (when `refuse`) and an
        abort is dropped, since its request is gone with the engine: returns False then.
        So in a fork of the process that built the AsyncLLM, whose engine is the parent's.
        """
        if in_forked_child("AsyncLLM", self._built_by) is not None:
            if refuse:
                self._raise_if_stopped()
            return False
        with self._mutex:
            if self._failure is not None or self._closed:
                if refuse:
                    self._raise_if_stopped()
                return False
            self._commands.append(command)
            if self._worker is None:
                self._worker = threading.Thread(target=self._run, name="shardline-engine",
                                                daemon=True)
                self._worker.start()
            return True

    def _run(self) -> None:
        """The engine thread: apply commands, step, deliver; end when there is no work.

        An exception other than a bad request's ValueError leaves the engine in an unknown
        state: every stream gets it, and the engine takes no more requests.
        """
        engine = self.engine
        while True:
            with self._mutex:
                if self._closed:
                    self._worker = None
                    return
                commands, self._commands = self._commands, []
                if not commands and not engine.has_unfinished_requests():
                    self._worker = None
                    return
            try:
                self._apply(commands)
                if engine.has_unfinished_requests():
                    self._route(engine.step())
            except Exception as exc:
                self._fail(exc, commands)
                return

    def _apply(self, commands: list[Command]) -> None:
        """Apply commands in order, removing each once applied (so, if one raises, it and
        the rest stay in the list) and delivering what those applied produced."""
        deliveries: list[tuple[Stream, Item]] = []
        try:
            while commands:
                if isinstance(commands[0], Add):
                    self._add(commands[0], deliveries)
                elif isinstance(commands[0], Call):
                    self._call(commands[0], deliveries)
                else:
                    self._abort(commands[0], deliveries)
                del commands[0]
        finally:
            self._deliver(deliveries)

    def _route(self, outputs: list[RequestOutput]) -> None:
        """Send a step's outputs to their streams; a finished request frees its id."""
        deliveries: list[tuple[Stream, Item]] = []
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if stream is None:
                continue
            deliveries.append((stream, output))
            if output.finished:
                del self._streams[output.request_id]
        self._deliver(deliveries)

    def _add(self, command: Add, deliveries: list[tuple[Stream, Item]]) -> None:
        stream = command.stream
        try:
            self.engine.add_request(stream.request_id, command.prompt, command.params,
                                    prompt_token_ids=command.prompt_token_ids)
        except ValueError as exc:
            deliveries.append((stream, exc))
            return
        self._streams[stream.request_id] = stream

    def _abort(self, command: Abort, deliveries: list[tuple[Stream, Item]]) -> None:
        current = self._streams.get(command.request_id)
        if command.owner is None or current is command.owner:
            aborted = self._streams.pop(command.request_id, None)
            output = self.engine.abort_request(command.request_id)
            if command.owner is None and aborted is not None and output is not None:
                deliveries.append((aborted, output))
        # Otherwise the owner's request already finished, and the id may be another's now.
        if command.waiter is not None:
            deliveries.append((command.waiter, ACK))

    def _call(self, command: Call, deliveries: list[tuple[Stream, Item]]) -> None:
        try:
            deliveries.append((command.waiter, Result(command.fn(self.engine))))
        except Exception as exc:
            deliveries.append((command.waiter, exc))

    def _fail(self, exc: Exception, unapplied: list[Command]) -> None:
        logger.error("the engine failed and accepts no more requests: %s", engine_dead(exc))
        with self._mutex:
            self._failure, self._failed_when = exc, "in an earlier step"
            self._worker = None
            commands, self._commands = self._commands, []
        self._end_streams(engine_dead(exc), unapplied + commands)

    def _end_streams(self, error: BaseException, commands: list[Command]) -> None:
        """After the engine thread has ended for good: fail every open stream and answer
        the commands it never applied."""
        deliveries: list[tuple[Stream, Item]] = [(s, error) for s in self._streams.values()]
        self._streams.clear()
        for command in commands:
            if isinstance(command, Add):
                deliveries.append((command.stream, error))
            elif command.waiter is not None:
                deliveries.append((command.waiter, ACK))
        self._deliver(deliveries)

    def _deliver(self, deliveries: list[tuple[Stream, Item]]) -> None:
        """Hand items to their streams' event loops, one wake-up per loop.

        A stream whose loop is closed can never be read: its request is aborted.
        """
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Stream, Item]]] = {}
        for stream, item in deliveries:
            by_loop.setdefault(stream.loop, []).append((stream, item))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:
                for stream, _ in items:
                    self._abort(Abort(stream.request_id, stream, None), [])


def _on_worker_death(llm: weakref.ref[AsyncLLM]) -> Callable[[EngineDeadError], None]:
    """The executor watcher's callback for a dead worker: from then on the AsyncLLM refuses
    new requests and check_health (a load balancer's probe) says why, also while idle, not
    once a step has failed on it. A running engine thread gets the error from its step
    and ends the open streams. Holds the AsyncLLM weakly, for garbage collection."""
    def callback(error: EngineDeadError) -> None:
        owner = llm()
        if owner is not None:
            with owner._mutex:
                if owner._failure is None:
                    owner._failure, owner._failed_when = error, "when a worker died"
    return callback


def _stop_at_exit(llm: weakref.ref[AsyncLLM]) -> None:
    """At exit, let the engine thread of an AsyncLLM nobody shut down finish its step (at
    most EXIT_WAIT_S) before the interpreter finalizes; the executor's own finalizer then
    stops the workers."""
    owner = llm()
    if owner is None or in_forked_child("AsyncLLM", owner._built_by) is not None:
        return
    worker = owner._close()
    if worker is not None:
        worker.join(EXIT_WAIT_S)


def _put_all(items: list[tuple[Stream, Item]]) -> None:
    for stream, item in items:
        stream.queue.put(None, item)


async def _acknowledged(waiter: Stream) -> None:
    """Wait for the engine thread's ACK; an error (the engine failed or was shut down)
    also ends the wait, since no answer follows it."""
    while True:
        _, item = await waiter.queue.get()
        if item is ACK or isinstance(item, BaseException):
            return

"""What the multi-process and Ray executors share: their workers as one group that serves
or dies as a whole, and the executor contract built on that group.

A `WorkerGroup` holds everything `shutdown` releases and knows whether the workers still
serve. A watcher thread waits for any worker to end (or to stay stopped, where the group
can tell); it then records the executor dead,
so that every waiting and later call raises the same EngineDeadError, and tells the death
callbacks (data-parallel cores fail together through them). `WorkerGroupExecutor` gives
`collective_rpc` (one reply per rank, in rank order, and a timeout that names the ranks
that did not answer) and `execute_model` (answered by the output rank, blocking or as a
StepFuture; once the group is dead, every step in flight fails with its error). A
subclass says only how a call reaches the workers and how their replies come back:
shared-memory rings to spawned processes, or Ray calls to node agents.

A step whose reply is long in coming is reported, not failed, unless the configuration
sets `step_timeout_s`: a long prefill on a slow CPU is legitimate, and a rank stuck in a
collective raises when the collective's timeout (distributed.parallel_state.
DEFAULT_TIMEOUT_S) ends it. After SLOW_STEP_S of waiting, and again each time the wait
doubles, a warning names the step's output rank and the workers write their Python stacks
to their stderr, where the group can ask them to. Past `step_timeout_s` (a worker in an
endless loop, a collective that never ends) the stacks are shown once more, the workers
are stopped, and the step and every one in flight fail with EngineDeadError.
"""

from __future__ import annotations

import builtins
import logging
import os
import reprlib
import threading
import time
import weakref
from abc import ABC, abstractmethod
from collections import deque
from typing import Any, Callable, Iterator

from shardline.executor.base import EngineDeadError, Executor, StepFuture
from shardline.step import ModelRunnerOutput, SchedulerOutput

logger = logging.getLogger("shardline")

# A worker's errors of these kinds are about the caller's input (a configuration the
# model cannot take, a missing file), and are re-raised as themselves.
_INPUT_ERRORS = (ValueError, TypeError, OSError)


def worker_error(context: str, reply: list[str]) -> Exception:
    """The exception a worker's call raised (its reply [type name, message, traceback]),
    re-made here: a built-in input error as the same type with a one-line message, so the
    caller sees what one rank in process would raise (its traceback goes to the debug
    log); anything else, a defect, as a RuntimeError that carries the traceback."""
    name, message, trace = reply
    kind = getattr(builtins, name, None)
    if isinstance(kind, type) and issubclass(kind, _INPUT_ERRORS):
        logger.debug("%s: %s", context, trace)
        return kind(f"{context}: {message}")
    return RuntimeError(f"{context}: {name}: {message}\n{trace}")

WATCH_POLL_S = 0.5
SLOW_STEP_S = 120.0
DEATH_WAIT_S = 2.0


class RanksTimedOut(TimeoutError):
    """A call's replies did not all come back in time: `ranks` (global) did not answer."""

    def __init__(self, ranks: list[int]) -> None:
        super().__init__(f"ranks {ranks} did not answer in time")
        self.ranks = ranks


class WorkerGroup(ABC):
    """The workers of one executor, alive or dead together, and what they hold.

    Kept apart from the executor so that the executor's finalizer and watcher thread hold
    no reference to it, and garbage collection can still reach an executor nobody shut
    down. `dead` is the error every call raises once a worker has died (or `fail` was
    called); `stopped` is set when `shutdown` has run.
    """

    watcher_name = "shardline-watch"
    # The serving groups of this process: a slow step shows the stacks of every group of
    # its world (the data-parallel cores), since a rank of another core may be what holds
    # it up (expert parallelism's all-to-all spans the cores), and the engine reads the
    # cores' steps one after the other.
    _serving_lock = threading.Lock()
    _serving: list["WorkerGroup"] = []

    def __init__(self, first_rank: int) -> None:
        self.first_rank = first_rank
        self.world: Any = None  # what the data-parallel cores of one world share
        self.dead: EngineDeadError | None = None
        self.lock = threading.Lock()
        self.on_death: list[Callable[[EngineDeadError], None]] = []
        self.stopping = False
        self.stopped = False
        self.owner_pid = os.getpid()

    @abstractmethod
    def wait_ended(self, timeout: float) -> list[Any] | None:
        """The workers found ended within `timeout` seconds (empty if none); None when
        they can no longer be watched."""

    @abstractmethod
    def describe_ended(self, ended: list[Any]) -> str:
        """Which workers ended and how, for the EngineDeadError."""

    @abstractmethod
    def stop_workers(self) -> None:
        """Ask the workers to stop and end those that do not."""

    @abstractmethod
    def release(self) -> None:
        """Give back what the stopped workers held (rings, placement, connections)."""

    def stalled(self) -> str | None:
        """Which workers live but can no longer serve (stopped processes), for the
        EngineDeadError; None while every live worker can. Polled by the watcher."""
        return None

    def interrupt(self) -> None:
        """Wake the calls waiting on the workers now, once the group is dead. Nothing to
        do where waiting calls check `dead` on their own."""

    def dump_stacks(self) -> str | None:
        """Ask every live worker of the world's groups (world_groups) to write its threads'
        Python stacks to its stderr; where they go (for the slow-step warning), or None
        where the group cannot ask."""
        return None

    def mark_serving(self, world: Any) -> None:
        """Every worker serves (one signalled before it set up its stack dump would die of
        the signal): from now on the slow steps of `world`'s groups show its stacks."""
        self.world = world
        with self._serving_lock:
            self._serving.append(self)

    def world_groups(self) -> list["WorkerGroup"]:
        """The serving groups of this group's world, in rank order."""
        with self._serving_lock:
            return sorted((group for group in self._serving if group.world == self.world),
                          key=lambda group: group.first_rank)

    def set_dead(self, error: EngineDeadError) -> bool:
        """Record why the executor stopped, so that every waiting and later call raises
        `error`; False (and nothing done) if it had stopped already."""
        with self.lock:
            if self.dead is not None or self.stopped:
                return False
            self.dead = error
        self.interrupt()
        return True

    def _watching(self) -> bool:
        return not self.stopping and self.dead is None

    def watch(self) -> None:
        """The watcher thread: when a worker ends (or `stalled` names one that cannot
        serve), the executor is dead; every pending and later call raises, and `on_death`
        is told."""
        while self._watching():
            ended = self.wait_ended(WATCH_POLL_S)
            if ended is None:
                return
            cause = self.describe_ended(ended) if ended else self.stalled()
            if cause and self._watching():
                self.die(EngineDeadError(cause))
                return

    def die(self, error: EngineDeadError) -> None:
        """Record `error` (see set_dead), log it and tell `on_death` (the other
        data-parallel cores fail with it); nothing if the group had stopped already."""
        if self.set_dead(error):
            logger.error("%s", error)
            for callback in self.on_death:
                callback(error)

    def start_watching(self) -> None:
        threading.Thread(target=self.watch, name=self.watcher_name, daemon=True).start()

    def check_alive(self) -> None:
        """Raise the error every call gets once the workers died or were shut down."""
        if self.dead is not None:
            raise self.dead
        if self.stopped:
            raise EngineDeadError("the executor has been shut down")

    def dead_error(self, cause: str) -> EngineDeadError:
        """The EngineDeadError behind a call whose transport failed under it: the
        watcher's, once it has seen the death (within DEATH_WAIT_S), else one saying
        `cause`."""
        dead = self._watched_death()
        return EngineDeadError(cause) if dead is None else dead

    def step_failure(self, rank: int, error: list[str]) -> EngineDeadError:
        """The output rank (global `rank`) failed a step and is exiting. Its error is often
        only that a peer died (its collectives see that before the watcher does), so the
        error names the workers the watcher finds dead, then the output rank's own error."""
        return self.rank_failure(f"worker rank {rank} failed in execute_model and stopped",
                                 error)

    def rank_failure(self, what: str, error: list[str]) -> EngineDeadError:
        """The EngineDeadError of a worker that reported `error` (its [type name, message,
        traceback]) and is exiting, as `what` says; the workers the watcher finds dead,
        if any, come first, as in `step_failure` (alone, when they include this rank's
        last words, the same error)."""
        name, message, trace = error
        failed = f"{what}: {name}: {message}\n{trace}"
        dead = self._watched_death()
        if dead is None:
            return EngineDeadError(failed)
        if f"{name}: {message}" in str(dead):  # the watcher heard it as the rank's last words
            return dead
        return EngineDeadError(f"{dead}; {failed}")

    def _watched_death(self) -> EngineDeadError | None:
        deadline = time.monotonic() + DEATH_WAIT_S
        while self.dead is None and not self.stopped and time.monotonic() < deadline:
            time.sleep(0.01)
        return self.dead

    def shutdown(self) -> None:
        """Stop the workers and release what they held. Idempotent. In a fork of the
        process that started them it does nothing: the copy's finalizer runs there too
        (at exit, on garbage collection), and the workers and rings are the parent's."""
        if self.stopped or os.getpid() != self.owner_pid:
            return
        self.stopping = True
        with self._serving_lock:
            if self in self._serving:
                self._serving.remove(self)
        self.stop_workers()
        with self.lock:
            self.stopped = True
        self.release()


class WorkerGroupExecutor(Executor):
    """An executor whose workers run outside the engine's process, as one WorkerGroup.

    `execute_model` sends a step and queues a ticket for its reply (whatever
    `_read_step` needs to find it); steps resolve in the order they were sent.
    """

    _group: WorkerGroup

    @abstractmethod
    def _new_group(self) -> WorkerGroup:
        """An empty group for this executor's slice of ranks."""

    @abstractmethod
    def _launch(self) -> None:
        """Start the workers into `self._group` and wait until they serve."""

    @abstractmethod
    def _send_step(self, step: dict) -> Any:
        """Send one step (SchedulerOutput.to_dict) to every worker; the ticket for its
        reply."""

    @abstractmethod
    def _read_step(self, ticket: Any, deadline: float | None) -> tuple[bool, Any]:
        """(ok, payload) of the output rank's reply to the step behind `ticket`."""

    @abstractmethod
    def _call_all(self, method: str, args: list, kwargs: dict, deadline: float | None
                  ) -> Iterator[tuple[int, bool, Any]]:
        """Send one call to every worker and yield (index in the slice, ok, payload) as
        replies come; RanksTimedOut past `deadline`."""

    def _start_workers(self) -> None:
        self.num_workers = self.ranks_per_core
        self.output_rank = self.config.parallel.output_rank  # within the slice
        self._pending: deque[tuple[StepFuture, Any]] = deque()
        self._group = group = self._new_group()
        self._finalizer = weakref.finalize(self, group.shutdown)
        self._launch()
        group.start_watching()

    def collective_rpc(self, method: str, args: tuple = (), kwargs: dict | None = None,
                       timeout: float | None = None) -> list[Any]:
        """Call `method` on every worker; one reply per rank, in rank order. Steps still in
        flight are collected first. TimeoutError names the ranks that did not answer."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._pending:
            self._collect_step(deadline)
        replies: list[Any] = [None] * self.num_workers
        try:
            for i, ok, payload in self._call_all(method, list(args), kwargs or {}, deadline):
                if not ok:
                    raise worker_error(f"{method} failed on worker rank {self.first_rank + i}",
                                       payload)
                replies[i] = payload
        except RanksTimedOut as exc:
            raise TimeoutError(f"collective_rpc({method!r}) timed out after {timeout} s "
                               f"waiting for ranks {exc.ranks}") from None
        return replies

    def execute_model(self, scheduler_output: SchedulerOutput, non_block: bool = False
                      ) -> ModelRunnerOutput | StepFuture:
        ticket = self._send_step(scheduler_output.to_dict())
        future = StepFuture(self._collect_step)
        self._pending.append((future, ticket))
        return future if non_block else future.result()

    def _collect_step(self, deadline: float | None) -> None:
        """Read the output rank's reply to the oldest step in flight. If the workers are
        dead, every step in flight fails with the error."""
        future, ticket = self._pending[0]
        try:
            ok, payload = self._read_step_reporting(ticket, deadline)
            if not ok:
                raise self._group.step_failure(self.first_rank + self.output_rank, payload)
            output = self._step_output(payload)
        except EngineDeadError as exc:
            for pending, _ in self._pending:
                pending.set_exception(exc)
            self._pending.clear()
            raise
        self._pending.popleft()
        future.set_result(output)

    def _read_step_reporting(self, ticket: Any, deadline: float | None) -> tuple[bool, Any]:
        """`_read_step`, warning (see the module docstring) each time the wait passes
        SLOW_STEP_S, then twice that, four times, and so on; past `step_timeout_s`, if
        set, the workers are stopped and the step fails."""
        started = time.monotonic()
        report_at = started + SLOW_STEP_S
        limit = self.config.parallel.step_timeout_s
        give_up = None if limit is None else started + limit
        while True:
            try:
                return self._read_step(ticket, min(t for t in (deadline, report_at, give_up)
                                                   if t is not None))
            except TimeoutError:
                now = time.monotonic()
                if deadline is not None and now >= deadline:
                    raise
                if give_up is not None and now >= give_up:
                    raise self._timed_out(now - started) from None
            # Here, not at the top: the CLI imports this module and must not load torch.
            from shardline.distributed.parallel_state import DEFAULT_TIMEOUT_S

            stacks = self._group.dump_stacks()
            logger.warning(
                "a step has waited %.0f s for the reply of worker rank %d (the output rank); "
                "%s. A rank stuck in a collective fails the step after its timeout (%.0f s); "
                "a long prefill on a slow machine may just take this long",
                time.monotonic() - started, self.first_rank + self.output_rank,
                f"the workers' Python stacks follow {stacks}" if stacks
                else "the workers' stacks cannot be shown from here", DEFAULT_TIMEOUT_S)
            report_at = started + 2 * (report_at - started)

    def _timed_out(self, waited: float) -> EngineDeadError:
        """Fail the executor for a step not answered within step_timeout_s: the workers
        show their stacks, the death callbacks are told (as by the watcher: the other
        data-parallel cores fail too), then the workers are stopped (one may spin
        forever, holding its device)."""
        stacks = self._group.dump_stacks()
        error = EngineDeadError(
            f"worker rank {self.first_rank + self.output_rank} (the output rank) did not "
            f"answer a step within step_timeout_s={self.config.parallel.step_timeout_s} "
            f"(waited {waited:.1f} s), so the workers were stopped; "
            + (f"their Python stacks are {stacks}" if stacks
               else "their stacks cannot be shown from here"))
        self._group.die(error)
        self.shutdown()
        return self._group.dead or error

    def _step_output(self, payload: Any) -> ModelRunnerOutput:
        """The step's output from the output rank's reply. A reply that is no
        ModelRunnerOutput (a frame corrupted into other data) kills the engine: the
        step's tokens are lost."""
        try:
            return ModelRunnerOutput.from_dict(payload)
        except (KeyError, TypeError, ValueError) as exc:
            error = EngineDeadError(
                f"the reply of worker rank {self.first_rank + self.output_rank} to a step is "
                f"not a ModelRunnerOutput ({type(exc).__name__}: {exc}): {reprlib.repr(payload)}")
            self._group.set_dead(error)
            raise self._group.dead or error from None

    def add_death_callback(self, callback: Callable[[EngineDeadError], None]) -> None:
        """Call `callback(error)` from the watcher thread when one of the workers dies."""
        self._group.on_death.append(callback)

    def fail(self, error: EngineDeadError) -> None:
        self._group.set_dead(error)

    def shutdown(self) -> None:
        self._finalizer()

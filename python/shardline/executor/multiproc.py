"""One worker process per rank, reached through the shared-memory rings.

The executor writes every call once into `rpc_broadcast_mq` (one ring, read by every
worker) and reads the replies from `worker_response_mqs[rank]` (one ring per worker).
`execute_model` is answered by the output rank alone (the first TP rank of the last
pipeline stage); its non-blocking form returns a StepFuture, so the engine can keep
several steps in flight. A watcher thread notices a worker's death at once (and a worker
left stopped within seconds: executor.stopped_workers) and closes the rings, so that every
pending and later call raises EngineDeadError instead of waiting. A worker that fails
says why as it exits (worker_proc.last_words, on the pipe that brought its response
ring's handle), and the error carries it, whichever rank failed.

Under data parallelism an executor runs one engine core's slice of the rank grid: its
workers hold global ranks (they join one torch.distributed world with every other
core's), and read the rings under their index within the slice.

The ranks rendezvous for torch.distributed (gloo or NCCL) at a FileRendezvous
(executor.rendezvous): a file store
in a private directory, removed at shutdown (explicit, after a worker's death or a failed
start, on garbage collection or at interpreter exit) by the last executor that uses it,
or, when the engine's process is killed, by the workers as they exit (worker_proc.EngineWatch).
Unlike a TCP port probed free and bound later, nothing else can take the file in between.
An executor makes its own, unless the caller gives a `distributed_init_method`: the URL of
one the caller made (data-parallel cores share one), or any other torch.distributed URL,
used as is and left alone.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import logging.handlers
import multiprocessing
import os
import sys
import time
from multiprocessing.connection import Connection
from multiprocessing.connection import wait as wait_for_sentinels
from typing import Any, Iterator

from shardline.executor.base import EngineDeadError
from shardline.executor.main_guard import main_guard_hint
from shardline.executor.rendezvous import FileRendezvous
from shardline.executor.stopped_workers import StoppedWorkers, describe_stopped
from shardline.executor.worker_group import RanksTimedOut, WorkerGroup, WorkerGroupExecutor
from shardline.executor.worker_proc import (ALL_RANKS, DUMP_STACKS_SIGNAL, SHUTDOWN,
                                            STACKS_GAP_S, UNREADABLE_CALL,
                                            UNREADABLE_CALL_EXIT, WorkerArgs, read_reply,
                                            replies_in_order, run_worker)
from shardline.ipc import FrameError, MessageQueue, PeerDied, RingClosed, sweep_orphans

logger = logging.getLogger("shardline")

STARTUP_TIMEOUT_S = 120.0
SHUTDOWN_GRACE_S = 5.0
DEAD_GRACE_S = 1.0
EXIT_STATUS_WAIT_S = 0.2
_SPAWN = multiprocessing.get_context("spawn")
WORKER_NAME = "shardline-worker-"


def _forget_the_parents_workers() -> None:
    """In a fork of this process, take the parent's workers off multiprocessing's list of
    this process's children, which the fork inherits: at the fork's exit, multiprocessing
    would SIGTERM them (they are daemons) and fail to join them, stopping the parent's
    engine."""
    children = multiprocessing.process._children
    for proc in list(children):
        if proc.name.startswith(WORKER_NAME) and proc._parent_pid != os.getpid():
            children.discard(proc)


os.register_at_fork(after_in_child=_forget_the_parents_workers)


def _exit_code(proc: multiprocessing.process.BaseProcess) -> int | None:
    """The exit code of a worker whose sentinel fired, read at once. A dying process
    closes its files, and so fires the sentinel, a moment before the kernel reports its
    exit status: only then is it waited for, briefly."""
    if proc.exitcode is None:
        proc.join(EXIT_STATUS_WAIT_S)
    return proc.exitcode


def unreadable_reply(rank: int, ring: str, error: str) -> EngineDeadError:
    """The engine's death when the response ring `ring` of worker rank `rank` held a
    frame that is no reply (`error`, read_reply's FrameError): the reply it stood for is
    lost and the ranks are out of step."""
    return EngineDeadError(f"could not read a reply of worker rank {rank} from its "
                           f"response ring {ring!r}: {error}")


def unreadable_call(rank: int, broadcast: str) -> str:
    """What worker rank `rank` did when it replied UNREADABLE_CALL, for
    WorkerGroup.rank_failure: it could not read a call from the ring `broadcast`."""
    return (f"worker rank {rank} could not read a call from the broadcast ring "
            f"{broadcast!r} and stopped")


def exit_cause(code: int | None, broadcast: str | None) -> str:
    """What follows "died with exit code CODE" for a worker fed by the ring `broadcast`
    (None before there is one): the cause that code stands for, if it stands for one."""
    if code == UNREADABLE_CALL_EXIT and broadcast is not None:
        return (f": it could not read a call from the broadcast ring {broadcast!r} "
                "(its log says why)")
    return ""


class _RankLogs(logging.Handler):
    """Re-emits a worker's log records through this process's logger of the same name."""

    def emit(self, record: logging.LogRecord) -> None:
        target = logging.getLogger(record.name)
        if target.isEnabledFor(record.levelno):
            target.handle(record)


class _Workers(WorkerGroup):
    """The processes, rings and log relay of one multi-process executor."""

    watcher_name = "shardline-worker-watch"

    def __init__(self, first_rank: int) -> None:
        super().__init__(first_rank)
        self.procs: list[multiprocessing.process.BaseProcess] = []
        self.rpc_broadcast_mq: MessageQueue | None = None
        self.worker_response_mqs: list[MessageQueue] = []
        self.last_words: list[Connection] = []  # each worker's, once it has started
        self.log_queue = _SPAWN.Queue()
        self.log_listener = logging.handlers.QueueListener(self.log_queue, _RankLogs())
        self.started = False
        self.rendezvous: FileRendezvous | None = None
        self.stopped_workers = StoppedWorkers()

    def close_rings(self) -> None:
        broadcast = [self.rpc_broadcast_mq] if self.rpc_broadcast_mq else []
        for mq in broadcast + self.worker_response_mqs:
            mq.close()

    def interrupt(self) -> None:
        """Close the rings: every call waiting on one raises at once."""
        self.close_rings()

    def wait_ended(self, timeout: float) -> list[int]:
        sentinels = {proc.sentinel: i for i, proc in enumerate(self.procs)}
        return sorted(sentinels[s] for s in wait_for_sentinels(list(sentinels), timeout))

    def describe_ended(self, ended: list[int]) -> str:
        # Every worker found dead is named: a peer's death makes the survivors' steps fail,
        # and they may exit before the watcher runs.
        deaths = []
        broadcast = self.rpc_broadcast_mq.handle().name if self.rpc_broadcast_mq else None
        for i in ended:
            proc = self.procs[i]
            code = _exit_code(proc)
            deaths.append(f"worker rank {self.first_rank + i} (pid {proc.pid}) died with "
                          f"exit code {code}" + exit_cause(code, broadcast)
                          + self.heard_last(i))
        return "; ".join(deaths)

    def heard_last(self, index: int) -> str:
        """What the worker at `index` said as it failed (worker_proc.last_words), for
        its line in the EngineDeadError; empty if it said nothing."""
        if index >= len(self.last_words):
            return ""
        conn = self.last_words[index]
        try:
            name, message, trace = conn.recv() if conn.poll(0) else ("", "", "")
        except (EOFError, OSError):
            return ""
        return f" after it failed: {name}: {message}\n{trace}" if name else ""

    def dump_stacks(self) -> str:
        # One worker at a time, each under a header: their writes to the shared stderr
        # would interleave otherwise.
        for group in self.world_groups():
            for i, proc in enumerate(group.procs):
                if proc.exitcode is not None:  # reaped, its pid may be another process's now
                    continue
                sys.stderr.write(f"--- the stacks of worker rank {group.first_rank + i} "
                                 f"(pid {proc.pid}):\n")
                sys.stderr.flush()
                with contextlib.suppress(OSError):  # ended meanwhile: the watcher tells
                    os.kill(proc.pid, DUMP_STACKS_SIGNAL)
                time.sleep(STACKS_GAP_S)
        return "on this process's stderr, which the workers share"

    def stalled(self) -> str | None:
        stalled = self.stopped_workers.poll([proc.pid for proc in self.procs])
        return "; ".join(
            describe_stopped(f"worker rank {self.first_rank + i} (pid {self.procs[i].pid})",
                             seconds) for i, seconds in stalled) or None

    def stop_workers(self) -> None:
        # Told to stop, a serving worker ends its call and releases what it holds. The
        # survivors of a dead group (or of a failed start) cannot be told: an idle one
        # has seen the rings close, a busy one may wait in a collective for the dead
        # rank until a gloo timeout of minutes, so they get a short grace.
        grace = DEAD_GRACE_S
        if self.started and self.dead is None:
            try:
                self.rpc_broadcast_mq.enqueue([0, SHUTDOWN, [], {}, ALL_RANKS], timeout=1.0)
                grace = SHUTDOWN_GRACE_S
            except (TimeoutError, RingClosed, PeerDied):
                pass
        deadline = time.monotonic() + grace
        for proc in self.procs:
            proc.join(max(0.0, deadline - time.monotonic()))
        for proc in self.procs:
            if proc.is_alive():
                proc.kill()
                proc.join(SHUTDOWN_GRACE_S)

    def release(self) -> None:
        self.close_rings()
        # A worker killed before this process attached its response ring (a start cut
        # short) left the ring's name in /dev/shm; its writer is dead by now, so the sweep
        # removes it here rather than at the next ring created on the machine.
        with contextlib.suppress(OSError):
            sweep_orphans()
        for conn in self.last_words:
            conn.close()
        try:
            self.log_listener.stop()
        except RuntimeError:
            # At interpreter exit Python 3.12 starts no thread, and the stop sentinel's put
            # would start the queue's feeder thread: the listener (a daemon) ends with us.
            pass
        self.log_queue.close()
        self.log_queue.join_thread()
        # The queue's three locks are named semaphores in /dev/shm (spawned workers open
        # them by name), unlinked only when the queue is freed: dropping it here frees
        # them now, not when the executor is collected.
        self.log_listener = self.log_queue = None
        if self.rendezvous is not None:
            self.rendezvous.release()


class MultiProcExecutor(WorkerGroupExecutor):
    """Spawns one worker process per rank on this machine and drives them over the rings."""

    _group: _Workers

    def _new_group(self) -> _Workers:
        return _Workers(self.first_rank)

    def _launch(self) -> None:
        self._call_ids = itertools.count(1)
        workers = self._group
        workers.log_listener.start()
        workers.rpc_broadcast_mq = MessageQueue.create(self.num_workers)
        workers.rendezvous = FileRendezvous.join(self.distributed_init_method)
        init_method = workers.rendezvous.url if workers.rendezvous else self.distributed_init_method
        rendezvous_dir = workers.rendezvous.directory if workers.rendezvous else None
        config = self.config.to_dict()
        conns = []
        for i in range(self.num_workers):
            rank = self.first_rank + i
            parent_conn, child_conn = _SPAWN.Pipe(duplex=False)
            args = WorkerArgs(config, rank, i, init_method, workers.rpc_broadcast_mq.handle(),
                              self.config.parallel.worker_cls, logger.getEffectiveLevel(),
                              os.getpid(), rendezvous_dir)
            proc = _SPAWN.Process(target=run_worker, args=(args, child_conn, workers.log_queue),
                                  name=f"{WORKER_NAME}{rank}", daemon=True)
            proc.start()
            child_conn.close()
            workers.procs.append(proc)
            conns.append(parent_conn)
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        for i, (proc, conn) in enumerate(zip(workers.procs, conns)):
            ready = wait_for_sentinels([conn, proc.sentinel],
                                       max(0.0, deadline - time.monotonic()))
            try:
                handle = conn.recv() if conn in ready else None
            except EOFError:
                handle = None
            if handle is None:
                raise self._startup_failure(i)
            workers.last_words.append(conn)
            try:
                workers.worker_response_mqs.append(MessageQueue.attach(handle, 0))
            except OSError as exc:  # its ring went with it: the worker died
                raise self._attach_failure(exc) from None
        try:
            workers.rpc_broadcast_mq.wait_attached(max(0.0, deadline - time.monotonic()),
                                                   reader_pids=[p.pid for p in workers.procs])
        except (PeerDied, TimeoutError) as exc:
            raise self._attach_failure(exc) from None
        workers.started = True
        workers.mark_serving(init_method)  # the world's URL, which its cores share

    def _attach_failure(self, exc: Exception) -> EngineDeadError:
        """The error of a start whose rings the workers did not all join (`exc`): one
        died (it may have failed building its worker already), or time ran out."""
        ended = self._group.wait_ended(EXIT_STATUS_WAIT_S)
        if ended:
            return EngineDeadError("the workers failed to start: "
                                   + self._group.describe_ended(ended))
        return EngineDeadError(f"the workers did not all join the executor's rings within "
                               f"{STARTUP_TIMEOUT_S:.0f} s: {exc}")

    def _startup_failure(self, index: int) -> EngineDeadError:
        proc = self._group.procs[index]
        rank = self.first_rank + index
        proc.join(1.0)
        if proc.is_alive():
            return EngineDeadError(f"worker rank {rank} (pid {proc.pid}) did not start within "
                                   f"{STARTUP_TIMEOUT_S:.0f} s")
        return EngineDeadError(f"worker rank {rank} (pid {proc.pid}) exited with code "
                               f"{proc.exitcode} while starting{main_guard_hint()}")

    def _rings_closed(self, exc: BaseException) -> EngineDeadError:
        return self._group.dead_error(f"the executor's rings closed: {exc}")

    def _send(self, method: str, args: list, kwargs: dict, reply_rank: int,
              deadline: float | None) -> int:
        self._group.check_alive()
        call_id = next(self._call_ids)
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            self._group.rpc_broadcast_mq.enqueue([call_id, method, args, kwargs, reply_rank],
                                                 timeout)
        except (RingClosed, PeerDied) as exc:
            raise self._rings_closed(exc) from None
        return call_id

    def _receive(self, index: int, call_id: int, deadline: float | None) -> tuple[bool, Any]:
        """(ok, payload) of the reply to `call_id` from the worker at `index` in this
        executor's slice, skipping late replies to calls abandoned after a timeout."""
        while True:
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                reply_id, ok, payload = self._read_reply(index, timeout)
            except (RingClosed, PeerDied) as exc:
                raise self._rings_closed(exc) from None
            if reply_id == call_id:
                return ok, payload
            if reply_id == UNREADABLE_CALL:
                raise self._group.rank_failure(
                    unreadable_call(self.first_rank + index,
                                    self._group.rpc_broadcast_mq.handle().name), payload)

    def _read_reply(self, index: int, timeout: float | None) -> list:
        """The next [reply_id, ok, payload] on the response ring of the worker at `index`.
        A frame that is corrupt, or no reply, kills the executor: the reply it stood for
        is lost and the ranks are out of step."""
        ring = self._group.worker_response_mqs[index]
        try:
            return read_reply(ring, timeout)
        except FrameError as exc:
            error = unreadable_reply(self.first_rank + index, ring.handle().name, str(exc))
            self._group.set_dead(error)
            raise self._group.dead or error from None

    def _call_all(self, method: str, args: list, kwargs: dict, deadline: float | None
                  ) -> Iterator[tuple[int, bool, Any]]:
        """The replies in rank order, except that a later rank's error comes as soon as it
        is seen (worker_proc.replies_in_order)."""
        call_id = self._send(method, args, kwargs, ALL_RANKS, deadline)

        def read(index: int, timeout: float) -> tuple[bool, Any]:
            return self._receive(index, call_id, time.monotonic() + timeout)

        try:
            for i, (ok, payload) in replies_in_order(list(range(self.num_workers)), read,
                                                     lambda reply: not reply[0], deadline):
                yield i, ok, payload
        except TimeoutError as exc:
            raise RanksTimedOut([self.first_rank + j for j in exc.args[0]]) from None

    def _send_step(self, step: dict) -> int:
        return self._send("execute_model", [step], {}, self.output_rank, None)

    def _read_step(self, call_id: int, deadline: float | None) -> tuple[bool, Any]:
        return self._receive(self.output_rank, call_id, deadline)

    @property
    def worker_pids(self) -> list[int]:
        """The process ids of this executor's workers, in rank order."""
        return [proc.pid for proc in self._group.procs]


"""One worker process per rank, reached through the shared-memory rings.

The executor writes every call once into `rpc_broadcast_mq` (one ring, read by every
worker) and reads the replies from `worker_response_mq[rank]` (one ring per worker).
`execute_model` is answered by the output rank alone (the first TP rank of the last
pipeline stage); its non-blocking form returns a StepFuture, so the engine can keep
several steps in flight. A watcher thread notices a worker's death at once and closes
the rings, so that every pending and later call raises EngineDeadError instead of waiting.

Under data parallelism an executor runs one engine core's slice of the rank grid: its
workers hold global ranks (they join one torch.distributed world with every other
core's), and read the rings under their index within the slice.
"""

from __future__ import annotations

import itertools
import logging
import logging.handlers
import multiprocessing
import socket
import threading
import time
import weakref
from collections import deque
from multiprocessing.connection import wait as wait_for_sentinels
from typing import Any, Callable

from shardline.executor.base import EngineDeadError, Executor, StepFuture
from shardline.executor.worker_proc import ALL_RANKS, SHUTDOWN, WorkerArgs, run_worker
from shardline.ipc import MessageQueue, PeerDied, RingClosed
from shardline.step import ModelRunnerOutput, SchedulerOutput

logger = logging.getLogger("shardline")

STARTUP_TIMEOUT_S = 120.0
SHUTDOWN_GRACE_S = 5.0
_SPAWN = multiprocessing.get_context("spawn")


def _free_tcp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class _RankLogs(logging.Handler):
    """Re-emits a worker's log records through this process's logger of the same name."""

    def emit(self, record: logging.LogRecord) -> None:
        target = logging.getLogger(record.name)
        if target.isEnabledFor(record.levelno):
            target.handle(record)


class _Workers:
    """The processes, rings and helper threads of one executor: everything `shutdown`
    releases. Kept apart from the executor so the finalizer holds no reference to it."""

    def __init__(self, first_rank: int) -> None:
        self.first_rank = first_rank
        self.procs: list[multiprocessing.process.BaseProcess] = []
        self.broadcast: MessageQueue | None = None
        self.responses: list[MessageQueue] = []
        self.log_queue = _SPAWN.Queue()
        self.log_listener = logging.handlers.QueueListener(self.log_queue, _RankLogs())
        self.dead: EngineDeadError | None = None
        self.dead_lock = threading.Lock()
        self.on_death: list[Callable[[EngineDeadError], None]] = []
        self.started = False
        self.stopping = False
        self.stopped = False

    def close_rings(self) -> None:
        for mq in ([self.broadcast] if self.broadcast else []) + self.responses:
            mq.close()

    def set_dead(self, error: EngineDeadError) -> bool:
        """Record why the executor stopped and close the rings, so that every waiting and
        later call raises `error`; False (and nothing done) if it had stopped already."""
        with self.dead_lock:
            if self.dead is not None or self.stopped:
                return False
            self.dead = error
        self.close_rings()
        return True

    def watch(self) -> None:
        """The watcher thread: on a worker's death, record it and close the rings, so that
        every waiting and later call raises EngineDeadError; then tell `on_death`."""
        sentinels = {proc.sentinel: i for i, proc in enumerate(self.procs)}
        while not self.stopping and self.dead is None:
            ready = wait_for_sentinels(list(sentinels), timeout=0.5)
            if ready and not self.stopping and self.dead is None:
                # Every worker found dead is named: a peer's death makes the survivors' steps
                # fail, and they may exit before this thread runs.
                deaths = []
                for i in sorted(sentinels[sentinel] for sentinel in ready):
                    proc = self.procs[i]
                    proc.join(1.0)
                    deaths.append(f"worker rank {self.first_rank + i} (pid {proc.pid}) died "
                                  f"with exit code {proc.exitcode}")
                error = EngineDeadError("; ".join(deaths))
                if self.set_dead(error):
                    logger.error("%s", error)
                    for callback in self.on_death:
                        callback(error)
                return

    def shutdown(self) -> None:
        """Ask the workers to stop, kill those that do not, release the rings. Idempotent."""
        if self.stopped:
            return
        self.stopping = True
        if self.started and self.dead is None:
            try:
                self.broadcast.enqueue([0, SHUTDOWN, [], {}, ALL_RANKS], timeout=1.0)
            except (TimeoutError, RingClosed, PeerDied):
                pass
        deadline = time.monotonic() + SHUTDOWN_GRACE_S
        for proc in self.procs:
            proc.join(max(0.0, deadline - time.monotonic()))
        for proc in self.procs:
            if proc.is_alive():
                proc.kill()
                proc.join(SHUTDOWN_GRACE_S)
        with self.dead_lock:
            self.stopped = True
        self.close_rings()
        self.log_listener.stop()
        self.log_queue.close()
        self.log_queue.join_thread()


class MultiProcExecutor(Executor):
    """Spawns one worker process per rank on this machine and drives them over the rings."""

    def _start_workers(self) -> None:
        parallel = self.config.parallel
        self.num_workers = self.ranks_per_core
        self.output_rank = parallel.output_rank  # within the slice, as the rings count
        self._call_ids = itertools.count(1)
        self._pending: deque[StepFuture] = deque()
        self._workers = workers = _Workers(self.first_rank)
        self._finalizer = weakref.finalize(self, workers.shutdown)
        workers.log_listener.start()
        workers.broadcast = MessageQueue.create(self.num_workers)
        init_method = (self.distributed_init_method
                       or f"tcp://127.0.0.1:{_free_tcp_port()}")
        config = self.config.to_dict()
        conns = []
        for i in range(self.num_workers):
            rank = self.first_rank + i
            parent_conn, child_conn = _SPAWN.Pipe(duplex=False)
            args = WorkerArgs(config, rank, i, init_method, workers.broadcast.handle(),
                              parallel.worker_cls, logger.getEffectiveLevel())
            proc = _SPAWN.Process(target=run_worker, args=(args, child_conn, workers.log_queue),
                                  name=f"shardline-worker-{rank}", daemon=True)
            proc.start()
            child_conn.close()
            workers.procs.append(proc)
            conns.append(parent_conn)
        try:
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
                workers.responses.append(MessageQueue.attach(handle, 0))
                conn.close()
            workers.broadcast.wait_attached(max(0.0, deadline - time.monotonic()),
                                            reader_pids=[p.pid for p in workers.procs])
            workers.started = True
        except BaseException:
            workers.shutdown()
            raise
        # The thread holds only `workers`, so garbage collection can still reach the executor.
        threading.Thread(target=workers.watch, name="shardline-worker-watch",
                         daemon=True).start()

    def _startup_failure(self, index: int) -> EngineDeadError:
        proc = self._workers.procs[index]
        rank = self.first_rank + index
        proc.join(1.0)
        if proc.is_alive():
            return EngineDeadError(f"worker rank {rank} (pid {proc.pid}) did not start within "
                                   f"{STARTUP_TIMEOUT_S:.0f} s")
        return EngineDeadError(f"worker rank {rank} (pid {proc.pid}) exited with code "
                               f"{proc.exitcode} while starting")

    def _check_alive(self) -> None:
        if self._workers.dead is not None:
            raise self._workers.dead
        if self._workers.stopped:
            raise EngineDeadError("the executor has been shut down")

    def _dead_error(self, exc: BaseException) -> EngineDeadError:
        """The EngineDeadError behind a ring that closed or lost its peer under a call."""
        deadline = time.monotonic() + 2.0
        while self._workers.dead is None and not self._workers.stopped \
                and time.monotonic() < deadline:
            time.sleep(0.01)
        if self._workers.dead is not None:
            return self._workers.dead
        return EngineDeadError(f"the executor's rings closed: {exc}")

    def _step_failure(self, error: str) -> EngineDeadError:
        """The output rank failed a step and is exiting. Its error is often only that a peer
        died (its collectives see that before the watcher does), so the error names the
        workers the watcher finds dead, then the output rank's own error."""
        failed = (f"worker rank {self.first_rank + self.output_rank} failed in execute_model "
                  f"and stopped: {error}")
        dead = self._dead_error(RuntimeError(failed))
        if dead is not self._workers.dead:  # no worker exited within the wait
            return EngineDeadError(failed)
        return EngineDeadError(f"{dead}; {failed}")

    def _send(self, method: str, args: list, kwargs: dict, reply_rank: int,
              deadline: float | None) -> int:
        self._check_alive()
        call_id = next(self._call_ids)
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            self._workers.broadcast.enqueue([call_id, method, args, kwargs, reply_rank], timeout)
        except (RingClosed, PeerDied) as exc:
            raise self._dead_error(exc) from None
        return call_id

    def _receive(self, index: int, call_id: int, deadline: float | None) -> tuple[bool, Any]:
        """(ok, payload) of the reply to `call_id` from the worker at `index` in this
        executor's slice, skipping late replies to calls abandoned after a timeout."""
        while True:
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                reply_id, ok, payload = self._workers.responses[index].dequeue(timeout)
            except (RingClosed, PeerDied) as exc:
                raise self._dead_error(exc) from None
            if reply_id == call_id:
                return ok, payload

    def collective_rpc(self, method: str, args: tuple = (), kwargs: dict | None = None,
                       timeout: float | None = None) -> list[Any]:
        """Call `method` on every worker; one reply per rank, in rank order. Steps still in
        flight are collected first. TimeoutError names the ranks that did not answer."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._pending:
            self._collect_step(deadline)
        call_id = self._send(method, list(args), kwargs or {}, ALL_RANKS, deadline)
        replies = []
        for i in range(self.num_workers):
            try:
                ok, payload = self._receive(i, call_id, deadline)
            except TimeoutError:
                waiting = list(range(self.first_rank + i, self.first_rank + self.num_workers))
                raise TimeoutError(f"collective_rpc({method!r}) timed out after {timeout} s "
                                   f"waiting for ranks {waiting}") from None
            if not ok:
                raise RuntimeError(f"{method} failed on worker rank {self.first_rank + i}: "
                                   f"{payload}")
            replies.append(payload)
        return replies

    def execute_model(self, scheduler_output: SchedulerOutput, non_block: bool = False
                      ) -> ModelRunnerOutput | StepFuture:
        call_id = self._send("execute_model", [scheduler_output.to_dict()], {},
                             self.output_rank, None)
        future = StepFuture(self._collect_step, call_id)
        self._pending.append(future)
        return future if non_block else future.result()

    def _collect_step(self, deadline: float | None) -> None:
        """Read the output rank's reply to the oldest step in flight."""
        future = self._pending[0]
        try:
            ok, payload = self._receive(self.output_rank, future.call_id, deadline)
            if not ok:
                raise self._step_failure(payload)
        except EngineDeadError as exc:
            for pending in self._pending:
                pending.set_exception(exc)
            self._pending.clear()
            raise
        self._pending.popleft()
        future.set_result(ModelRunnerOutput.from_dict(payload))

    @property
    def worker_pids(self) -> list[int]:
        """The process ids of this executor's workers, in rank order."""
        return [proc.pid for proc in self._workers.procs]

    def add_death_callback(self, callback: Callable[[EngineDeadError], None]) -> None:
        """Call `callback(error)` from the watcher thread when one of the workers dies."""
        self._workers.on_death.append(callback)

    def fail(self, error: EngineDeadError) -> None:
        self._workers.set_dead(error)

    def shutdown(self) -> None:
        self._finalizer()


"""The body of one worker process of the multi-process executor.

A worker attaches to the executor's broadcast queue as reader `index` (its place in the
executor's slice of ranks, which is its rank unless data parallelism gives every engine
core a slice of its own), creates its own
response queue, and then serves calls until told to stop: each call names a method of its
Worker, and the worker replies when the call is addressed to it (every rank, or only the
output rank for `execute_model`). Plain data crosses the rings; the scheduler output and
model runner output travel as dicts.

A worker ends with the engine's process (its parent) even when that is killed: an idle
worker learns of it from the rings (PeerDied), and an EngineWatch thread ends one that is
inside a call, which might never return (a collective waiting for ranks the dead engine
never reached). The killed engine cannot remove its world's rendezvous directory, so the
workers do: the world ended with the engine, which alone used it.
"""

from __future__ import annotations

import faulthandler
import logging
import logging.handlers
import os
import reprlib
import select
import shutil
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, Callable, Iterator, NoReturn

from shardline.executor.stopped_workers import process_state
from shardline.ipc import FrameError, MessageQueue, MessageQueueHandle, PeerDied, RingClosed
from shardline.worker.worker_class import import_worker_class

SHUTDOWN = "__shutdown__"
ALL_RANKS = -1
# The reply id (call ids start at 1) and the exit code of a worker that could not read a
# call from the broadcast ring and stops: the executor fails on the reply, whichever call
# it waits for, and names the cause when it sees the exit first.
UNREADABLE_CALL = 0
UNREADABLE_CALL_EXIT = 3
ATTACH_TIMEOUT_S = 60.0
ANSWER_POLL_S = 0.5  # how often a call's replies are checked for a later rank's failure
ENGINE_POLL_S = 0.1
# Asks a worker for its threads' Python stacks on its stderr (the slow-step warning: see
# worker_group); faulthandler writes them from the signal handler, whatever the worker's
# main thread is blocked in.
DUMP_STACKS_SIGNAL = signal.SIGUSR1
STACKS_GAP_S = 0.1  # for a worker to write its stacks before the next one is asked


@dataclass(frozen=True)
class WorkerArgs:
    """What the executor hands a worker process at spawn (picklable). `engine_pid` is the
    executor's process, which the worker ends with; `rendezvous_dir` the directory of
    the FileRendezvous the executor made or joined, None where it was the caller's."""

    config: dict
    rank: int
    index: int
    distributed_init_method: str
    broadcast: MessageQueueHandle
    worker_cls: str
    log_level: int
    engine_pid: int
    rendezvous_dir: str | None


LAST_WORDS_LIMIT = 16 * 1024  # well under a pipe's buffer: the send never blocks


class _StepFailed(Exception):
    """A step failed on this rank (the error, its cause, is sent as the reply): the ranks
    are out of step in their collectives, and this worker stops."""


def last_words(exc: BaseException) -> list[str]:
    """What a worker that stops on `exc` tells its executor as it exits (error_reply's
    triple, the traceback cut to its end where the whole would not fit a pipe), so that
    the executor's EngineDeadError says why the worker died, whichever rank it was."""
    name, message, trace = error_reply(exc)
    message = message[:LAST_WORDS_LIMIT // 4]
    return [name, message, trace[-(LAST_WORDS_LIMIT // 2):]]


def error_reply(exc: BaseException) -> list[str]:
    """A failed call's reply payload: the exception's type name, message and traceback,
    from which the executor re-raises it (see worker_group.worker_error)."""
    return [type(exc).__name__, str(exc), "".join(traceback.format_exception(exc))]


def _is_error_reply(payload: object) -> bool:
    """Whether a failed call's payload is what error_reply makes."""
    return type(payload) is list and len(payload) == 3 and all(type(p) is str for p in payload)


def read_reply(ring: MessageQueue, timeout: float | None = None) -> list:
    """The next [reply_id, ok, payload] on a worker's response ring (payload an error
    triple when not ok); FrameError when the frame is corrupt or holds no reply. Shared
    by the multi-process executor and the Ray executor's node agents."""
    reply = ring.dequeue(timeout)
    if (type(reply) is not list or len(reply) != 3 or type(reply[0]) is not int
            or type(reply[1]) is not bool or not (reply[1] or _is_error_reply(reply[2]))):
        raise FrameError(f"the ring holds {reprlib.repr(reply)}, not a reply "
                         "[call_id, ok, payload]")
    return reply


def replies_in_order(indices: list[int], read: Callable[[int, float], Any],
                     failed: Callable[[Any], bool], deadline: float | None = None
                     ) -> Iterator[tuple[int, Any]]:
    """(index, reply) for each of `indices` in order, each read by `read(index, timeout)`
    (TimeoutError when none is back by then). Once a later index's reply is back as a
    failure while an earlier one is still out (looked for every ANSWER_POLL_S), that
    failure comes next and nothing after it: the earlier rank may never answer, as when
    it waits in a collective for the rank that failed (init_device's rendezvous). Past
    `deadline`, TimeoutError whose argument lists the indices still out. Shared by the
    multi-process executor and the Ray executor's node agents."""
    received: dict[int, Any] = {}
    for i in indices:
        while i not in received:
            poll = time.monotonic() + ANSWER_POLL_S
            until = poll if deadline is None else min(poll, deadline)
            try:
                received[i] = read(i, max(0.0, until - time.monotonic()))
            except TimeoutError:
                if deadline is not None and time.monotonic() >= deadline:
                    raise TimeoutError([j for j in indices if j not in received]) from None
                failure = _failed_early(indices, read, failed, received)
                if failure is not None:
                    yield failure, received[failure]
                    return
        yield i, received[i]


def _failed_early(indices: list[int], read: Callable[[int, float], Any],
                  failed: Callable[[Any], bool], received: dict[int, Any]) -> int | None:
    """Read, without waiting, the replies already back into `received`; the index of
    one that is a failure, if any."""
    for j in indices:
        if j in received:
            continue
        try:
            received[j] = read(j, 0.0)
        except TimeoutError:
            continue
        if failed(received[j]):
            return j
    return None


def _forward_logs(log_queue: Any, rank: int, level: int) -> None:
    """Send this process's log records to the executor, each message prefixed by the rank."""
    class RankPrefix(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            record.msg = f"[rank {rank}] {record.msg}"
            return True

    handler = logging.handlers.QueueHandler(log_queue)
    handler.addFilter(RankPrefix())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    logging.getLogger("shardline").setLevel(level)


class EngineWatch:
    """Ends this worker process once the engine's process `engine_pid` (its parent) has
    ended, from a thread of its own, whatever the worker is doing; `exit` ends it too.
    Either way, once the engine is gone, the world's private `rendezvous_dir` (None where
    the engine did not make one) is removed first: every worker of the world tries. (Ray
    rank actors do not run this: Ray ends a driver's actors when the driver dies.)"""

    def __init__(self, engine_pid: int, rendezvous_dir: str | None) -> None:
        self._engine_pid = engine_pid
        self._rendezvous_dir = rendezvous_dir
        self._lock = threading.Lock()
        try:
            pidfd: int | None = os.pidfd_open(engine_pid)
        except OSError:  # no pidfd on this kernel, or the engine is already gone
            pidfd = None
        # While this process is its child, the pid cannot name a later process.
        if pidfd is not None and os.getppid() != engine_pid:
            os.close(pidfd)
            pidfd = None
        self._pidfd = pidfd
        threading.Thread(target=self._watch, name="shardline-engine-watch", daemon=True).start()

    def engine_gone(self, wait: float | None = 0.0) -> bool:
        """Whether the engine's process has ended, waiting up to `wait` seconds for it
        (None: until it has). Its main thread's end counts, as it does for the rings: a
        killed process's other threads end a moment later."""
        if self._pidfd is None:
            time.sleep(ENGINE_POLL_S if wait is None else wait)
            if os.getppid() != self._engine_pid:  # an orphan is adopted at once
                return True
        else:
            ended = select.poll()  # one per call: a poll object refuses concurrent waits
            ended.register(self._pidfd, select.POLLIN)
            if ended.poll(None if wait is None else wait * 1000):
                return True
        return self._main_thread_ended()

    def _main_thread_ended(self) -> bool:
        state = process_state(self._engine_pid)
        return state is None or state in "ZXx"  # zombie or dead

    def _watch(self) -> None:
        while not self.engine_gone(None):
            pass
        sys.stdout.flush()
        sys.stderr.flush()
        self.exit(0)

    def exit(self, code: int) -> NoReturn:
        """End this process with `code` (os._exit), removing the rendezvous directory
        first if the engine is gone. The engine is the directory's only user, and removes
        it itself on every path but its own sudden death."""
        if self._rendezvous_dir is not None and self.engine_gone():
            with self._lock:
                self._remove_rendezvous()
        os._exit(code)

    def _remove_rendezvous(self) -> None:
        # Renamed first: a rank still in torch.distributed's teardown could otherwise
        # create the store file again between the removal of the file and of the directory.
        removing = f"{self._rendezvous_dir}.removed-by-{os.getpid()}"
        try:
            os.rename(self._rendezvous_dir, removing)
        except OSError:
            return  # another rank of the world took it
        shutil.rmtree(removing, ignore_errors=True)


def run_worker(args: WorkerArgs, handle_conn: Connection, log_queue: Any) -> None:
    """Process entry point: connect, then serve calls until shutdown or the executor dies.
    `handle_conn` carries the response ring's handle to the executor, then this worker's
    last words if it fails."""
    faulthandler.register(DUMP_STACKS_SIGNAL, all_threads=True)
    watch = EngineWatch(args.engine_pid, args.rendezvous_dir)
    # Ctrl-C goes to the whole process group; the executor decides when workers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _forward_logs(log_queue, args.rank, args.log_level)
    response = MessageQueue.create(1)
    handle_conn.send(response.handle())
    try:
        broadcast = MessageQueue.attach(args.broadcast, args.index)
    except FileNotFoundError:
        # The executor removes its broadcast ring once every worker attached it, or when
        # it shuts down: this worker never attached, so the engine stopped (or was
        # interrupted) while this process started. Nothing to serve and no one to tell.
        response.close()
        watch.exit(1)
    response.wait_attached(ATTACH_TIMEOUT_S, reader_pids=[os.getppid()])

    def tell(words: list[str]) -> None:
        try:
            handle_conn.send(words)
        except OSError:
            pass  # the executor is gone, and this process ends with it

    exit_code = serve_rank(args.config, args.rank, args.index, args.distributed_init_method,
                           args.worker_cls, broadcast, response, tell)
    handle_conn.close()
    log_queue.close()
    log_queue.join_thread()
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip the interpreter's teardown: with torch loaded its final garbage collection
    # takes seconds, and everything this process owns is released in serve_rank.
    watch.exit(exit_code)


def serve_rank(config: dict, rank: int, index: int, distributed_init_method: str,
               worker_cls: str, broadcast: MessageQueue, response: MessageQueue,
               tell: Callable[[list[str]], None] | None = None) -> int:
    """Build rank `rank`'s worker and answer the calls read from `broadcast` on `response`
    until shutdown or the executor's end; the process's exit code (1 after a failure,
    UNREADABLE_CALL_EXIT after a corrupt frame on the broadcast ring). On a failure,
    `tell` (if given) gets its last_words before the worker is released.
    `index` is the rank's place in its executor's slice, which calls address replies to.
    Shared by every executor that feeds its workers through the rings (multi-process, Ray).
    """
    from shardline.config import EngineConfig

    worker = None
    exit_code = 0
    failure: BaseException | None = None
    try:
        worker = import_worker_class(worker_cls)(
            EngineConfig.from_dict(config), rank=rank,
            distributed_init_method=distributed_init_method)
        exit_code = _serve(worker, index, broadcast, response)
    except (PeerDied, RingClosed):
        pass  # the executor is gone or shut us down: nothing left to answer
    except _StepFailed as failed:
        failure = failed.__cause__
        logging.getLogger("shardline").error("execute_model failed: %s", failure)
    except BaseException as exc:
        traceback.print_exc()
        failure = exc
    finally:
        if failure is not None:
            exit_code = 1
            if tell is not None:
                tell(last_words(failure))
        if worker is not None and hasattr(worker, "shutdown"):
            worker.shutdown()
        # Only the response ring is closed: the broadcast ring is the executor's, and closing
        # it would close it for every rank, so a failing worker would stop the healthy ones
        # too, perhaps before the executor sees which worker failed first.
        response.close()
    return exit_code


def _serve(worker: Any, index: int, broadcast: MessageQueue, response: MessageQueue) -> int:
    """Answer calls until shutdown (exit code 0) or a call that cannot be read
    (UNREADABLE_CALL_EXIT); _StepFailed after a failed step. `index` is this worker's
    place in its executor's slice, which calls address replies to."""
    from shardline.step import SchedulerOutput

    while True:
        try:
            call_id, method, call_args, kwargs, reply_rank = _next_call(broadcast)
        except FrameError as exc:
            # The call, whatever it was, is lost, and the ranks would be out of step: this
            # worker reports the error and stops, as after a failed step.
            logging.getLogger("shardline").error(
                "could not read a call from the broadcast ring %r: %s",
                broadcast.handle().name, exc)
            response.enqueue([UNREADABLE_CALL, False, error_reply(exc)])
            return UNREADABLE_CALL_EXIT
        if method == SHUTDOWN:
            return 0
        replies = reply_rank in (ALL_RANKS, index)
        try:
            if method == "execute_model":
                result = worker.execute_model(SchedulerOutput.from_dict(call_args[0]))
                result = result.to_dict() if replies else None
            else:
                result = getattr(worker, method)(*call_args, **kwargs)
        except Exception as exc:
            response.enqueue([call_id, False, error_reply(exc)])
            if method == "execute_model":
                raise _StepFailed from exc
            continue
        if not replies:
            continue
        try:
            response.enqueue([call_id, True, result])
        except TypeError as exc:
            # The result holds a type the rings cannot carry, refused before anything was
            # sent: the caller gets the error and this worker serves on (unless it was a
            # step's output, which stops it as a failed step does).
            response.enqueue([call_id, False, error_reply(exc)])
            if method == "execute_model":
                raise _StepFailed from exc


def _next_call(broadcast: MessageQueue) -> list:
    """The next call on the broadcast ring, [call_id, method, args, kwargs, reply_rank].
    FrameError when its frame is corrupt, or decodes to something else than a call."""
    call = broadcast.dequeue()
    if type(call) is not list or len(call) != 5:
        raise FrameError(f"the broadcast ring holds {reprlib.repr(call)}, not a call "
                         "[call_id, method, args, kwargs, reply_rank]")
    return call

"""The body of one worker process of the multi-process executor.

A worker attaches to the executor's broadcast queue as reader `index` (its place in the
executor's slice of ranks, which is its rank unless data parallelism gives every engine
core a slice of its own), creates its own
response queue, and then serves calls until told to stop: each call names a method of its
Worker, and the worker replies when the call is addressed to it (every rank, or only the
output rank for `execute_model`). Plain data crosses the rings; the scheduler output and
model runner output travel as dicts.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import signal
import sys
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from shardline.ipc import MessageQueue, MessageQueueHandle, PeerDied, RingClosed
from shardline.worker.worker_class import import_worker_class

SHUTDOWN = "__shutdown__"
ALL_RANKS = -1
ATTACH_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class WorkerArgs:
    """What the executor hands a worker process at spawn (picklable)."""

    config: dict
    rank: int
    index: int
    distributed_init_method: str
    broadcast: MessageQueueHandle
    worker_cls: str
    log_level: int


def error_text(exc: BaseException) -> str:
    """An exception as the one-line summary first, then its traceback."""
    summary = f"{type(exc).__name__}: {exc}"
    return summary + "\n" + "".join(traceback.format_exception(exc))


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


def run_worker(args: WorkerArgs, handle_conn: Connection, log_queue: Any) -> None:
    """Process entry point: connect, then serve calls until shutdown or the executor dies."""
    # Ctrl-C goes to the whole process group; the executor decides when workers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _forward_logs(log_queue, args.rank, args.log_level)
    response = MessageQueue.create(1)
    handle_conn.send(response.handle())
    handle_conn.close()
    broadcast = MessageQueue.attach(args.broadcast, args.index)
    response.wait_attached(ATTACH_TIMEOUT_S, reader_pids=[os.getppid()])

    exit_code = serve_rank(args.config, args.rank, args.index, args.distributed_init_method,
                           args.worker_cls, broadcast, response)
    log_queue.close()
    log_queue.join_thread()
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip the interpreter's teardown: with torch loaded its final garbage collection
    # takes seconds, and everything this process owns is released in serve_rank.
    os._exit(exit_code)


def serve_rank(config: dict, rank: int, index: int, distributed_init_method: str,
               worker_cls: str, broadcast: MessageQueue, response: MessageQueue) -> int:
    """Build rank `rank`'s worker and answer the calls read from `broadcast` on `response`
    until shutdown or the executor's end; the process's exit code (1 after a failure).
    `index` is the rank's place in its executor's slice, which calls address replies to.
    Shared by every executor that feeds its workers through the rings (multi-process, Ray).
    """
    from shardline.config import EngineConfig

    worker = None
    exit_code = 0
    try:
        worker = import_worker_class(worker_cls)(
            EngineConfig.from_dict(config), rank=rank,
            distributed_init_method=distributed_init_method)
        exit_code = _serve(worker, index, broadcast, response)
    except (PeerDied, RingClosed):
        pass  # the executor is gone or shut us down: nothing left to answer
    except BaseException:
        traceback.print_exc()
        exit_code = 1
    finally:
        if worker is not None and hasattr(worker, "shutdown"):
            worker.shutdown()
        # Only the response ring is closed: the broadcast ring is the executor's, and closing
        # it would close it for every rank, so a failing worker would stop the healthy ones
        # too, perhaps before the executor sees which worker failed first.
        response.close()
    return exit_code


def _serve(worker: Any, index: int, broadcast: MessageQueue, response: MessageQueue) -> int:
    """Answer calls until shutdown (exit code 0) or a failed step (exit code 1); `index`
    is this worker's place in its executor's slice, which calls address replies to."""
    from shardline.step import SchedulerOutput

    while True:
        call_id, method, call_args, kwargs, reply_rank = broadcast.dequeue()
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
            response.enqueue([call_id, False, error_text(exc)])
            if method == "execute_model":
                # The ranks are now out of step in their collectives: this worker stops, and
                # the executor reports the engine dead with this error.
                logging.getLogger("shardline").error("execute_model failed: %s", exc)
                return 1
            continue
        if replies:
            response.enqueue([call_id, True, result])

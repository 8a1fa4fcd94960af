"""The Ray executor's actors: one RankActor per rank, one NodeAgent per node.

A node's agent owns the node's broadcast ring: each call reaches it once over Ray and it
writes the call into the ring, which every rank of the node reads, exactly as the
multi-process executor's workers read theirs; each rank answers on its own response
ring, which the agent reads and returns over Ray (for `execute_model`, only the output
rank answers). So a step's input crosses the network once per node and never goes
through TCP inside a node.

The agent is a threaded actor: calls may arrive in any order and several wait at once
(steps in flight, a call abandoned after a timeout), so each call carries the executor's
call id, is written into the ring in id order, and reads its replies in the same order.
Where a rank's ring holds no reply the agent can read (a corrupt frame), or the rank
reports that it could not read a call, the agent returns that fact in place of the reply,
and the executor fails as the multi-process executor does.
"""

from __future__ import annotations

import contextlib
import faulthandler
import logging
import os
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

from shardline.executor.proc_stat import start_time, still_running
from shardline.executor.stopped_workers import StoppedWorkers
from shardline.executor.worker_group import WATCH_POLL_S
from shardline.executor.worker_proc import (ATTACH_TIMEOUT_S, DUMP_STACKS_SIGNAL,
                                            STACKS_GAP_S, UNREADABLE_CALL, read_reply,
                                            replies_in_order, serve_rank)
from shardline.ipc import FrameError, MessageQueue, MessageQueueHandle, sweep_orphans

AGENT_CONCURRENCY = 64
"""Threads of a node agent: calls waiting for their turn or their replies, plus one
`run_until_closed`."""
WAIT_POLL_S = 0.01
"""How often a sweep at shutdown (sweep_when_ended) looks whether the killed ranks of its
node have ended."""


@dataclass(frozen=True)
class UnreadableReply:
    """In place of a rank's reply: its response ring `ring` held a frame that is no reply
    (`error`, the FrameError's message)."""

    ring: str
    error: str


@dataclass(frozen=True)
class UnreadableCall:
    """In place of a rank's reply: the rank could not read a call from the broadcast ring
    `ring` and stopped; `error` is its report, [type name, message, traceback]."""

    ring: str
    error: list[str]


def sweep_when_ended(ranks: list[tuple[int, str | None]], timeout: float) -> list[str]:
    """Wait up to `timeout` seconds for the processes `ranks` (pid and start time of each;
    a start time of None is not waited for) to end, then remove the rings of dead writers
    on this machine (ipc.sweep_orphans); the names removed. A ring's name stays in
    /dev/shm until every reader has attached, and ray.kill skips the unlink, so the
    rings of killed ranks are orphans only once their processes are gone."""
    deadline = time.monotonic() + timeout
    while any(started is not None and still_running(pid, started)
              for pid, started in ranks) and time.monotonic() < deadline:
        time.sleep(WAIT_POLL_S)
    with contextlib.suppress(OSError):  # /dev/shm unlistable: nothing to sweep
        return sweep_orphans()
    return []


def is_failure(reply: Any) -> bool:
    """Whether an agent's reply for one rank reports a failure: an error, or what stands
    in place of a reply it could not read."""
    return isinstance(reply, (UnreadableReply, UnreadableCall)) or (
        isinstance(reply, list) and not reply[0])


class RankActor:
    """One rank: tells the executor its process (`identify`), creates its response ring
    (`describe`), then serves the node's broadcast ring in `run` (through
    worker_proc.serve_rank, the multi-process workers' loop) until told to stop; the
    executor kills the actor after that."""

    def __init__(self, rank: int, log_level: int) -> None:
        logging.basicConfig(stream=sys.stderr, level=logging.WARNING,
                            format=f"[rank {rank}] %(levelname)s %(name)s: %(message)s")
        logging.getLogger("shardline").setLevel(log_level)
        faulthandler.register(DUMP_STACKS_SIGNAL, all_threads=True)
        self.response: MessageQueue | None = None

    def identify(self) -> dict:
        """This rank's process id and the process's start time (proc_stat), by which the
        node agent tells when the rank has ended (release_rings). The executor asks for
        them before any ring of the rank exists, so that a start cut short always knows
        which processes to wait for before it sweeps their rings."""
        return {"pid": os.getpid(), "started": start_time(os.getpid())}

    def describe(self) -> dict:
        """Create this rank's response ring (once); what the executor needs to wire the
        rank up: the ring's handle, with `identify`'s pid and start time."""
        if self.response is None:
            self.response = MessageQueue.create(1)
        return {"response": self.response.handle(), **self.identify()}

    def run(self, config: dict, rank: int, index: int, reader_index: int,
            distributed_init_method: str, worker_cls: str, broadcast: MessageQueueHandle,
            agent_pid: int) -> int:
        """Attach to the node's broadcast ring as reader `reader_index` and serve calls
        until shutdown; the exit code (0, 1 after a failure, UNREADABLE_CALL_EXIT after a
        call it could not read). `index` is the rank's place in its executor's slice."""
        ring = MessageQueue.attach(broadcast, reader_index)
        self.response.wait_attached(ATTACH_TIMEOUT_S, reader_pids=[agent_pid])
        return serve_rank(config, rank, index, distributed_init_method, worker_cls, ring,
                          self.response)


class NodeAgent:
    """Relays the executor's calls to the ranks of one node through shared memory."""

    def __init__(self) -> None:
        self.rpc_broadcast_mq: MessageQueue | None = None
        self.worker_response_mqs: list[MessageQueue] = []
        self.sending = threading.Condition()
        self.reading = threading.Condition()
        self.next_call = 1
        self.next_ticket = 0
        self.reading_ticket = 0
        self.closed = threading.Event()
        self.rank_pids: list[int] = []
        self.rank_start_times: list[str | None] = []

    def connect(self, responses: list[MessageQueueHandle]) -> tuple[MessageQueueHandle, int]:
        """Attach to the ranks' response rings (in the node's rank order) and create the
        broadcast ring they read; its handle and this process's id."""
        self.worker_response_mqs = [MessageQueue.attach(handle, 0) for handle in responses]
        self.rpc_broadcast_mq = MessageQueue.create(len(responses))
        return self.rpc_broadcast_mq.handle(), os.getpid()

    def wait_attached(self, timeout: float, reader_pids: list[int]) -> None:
        self.rpc_broadcast_mq.wait_attached(timeout, reader_pids=reader_pids)
        self.rank_pids = list(reader_pids)
        self.rank_start_times = [start_time(pid) for pid in reader_pids]

    def call(self, call_id: int, message: list, reply_indices: list[int]) -> list[Any]:
        """Write call `call_id` into the ring once the calls before it are in; then read
        the replies [ok, payload] of the ranks at `reply_indices` (in the node's order),
        an UnreadableReply or UnreadableCall in place of the reply a rank's ring lost."""
        with self.sending:
            self.sending.wait_for(lambda: self.next_call == call_id or self.closed.is_set())
            try:
                self._check_open()
                self.rpc_broadcast_mq.enqueue(message)
            finally:
                self.next_call += 1
                self.sending.notify_all()
            ticket = self.next_ticket
            if reply_indices:
                self.next_ticket += 1
        if not reply_indices:
            return []
        with self.reading:
            self.reading.wait_for(lambda: self.reading_ticket == ticket or self.closed.is_set())
            self._check_open()
        try:
            return self._replies(call_id, reply_indices)
        finally:
            with self.reading:
                self.reading_ticket += 1
                self.reading.notify_all()

    def _replies(self, call_id: int, reply_indices: list[int]) -> list[Any]:
        """The replies to `call_id` of the ranks at `reply_indices`, in that order; once a
        later rank's failure is back while an earlier rank has not answered
        (worker_proc.replies_in_order), None for the ranks still out: the executor raises
        the failure."""
        def read(index: int, timeout: float) -> Any:
            return self._reply(self.worker_response_mqs[index], call_id, timeout)

        replies = dict(replies_in_order(reply_indices, read, is_failure))
        return [replies.get(j) for j in reply_indices]

    def _reply(self, response: MessageQueue, call_id: int, timeout: float | None = None
               ) -> list | UnreadableReply | UnreadableCall:
        """The reply to `call_id`, skipping stray ones (a rank that failed a step it did
        not have to answer sends its error anyway); what stands in its place when the
        ring holds no readable reply or the rank could not read a call. TimeoutError
        when none is back within `timeout` seconds."""
        while True:
            try:
                reply_id, ok, payload = read_reply(response, timeout)
            except FrameError as exc:
                return UnreadableReply(response.handle().name, str(exc))
            if reply_id == call_id:
                return [ok, payload]
            if reply_id == UNREADABLE_CALL:
                return UnreadableCall(self.rpc_broadcast_mq.handle().name, payload)

    def _check_open(self) -> None:
        if self.closed.is_set():
            raise RuntimeError("the node agent has been closed")

    def dump_stacks(self) -> None:
        """Ask this node's ranks to write their Python stacks to their stderr (the slow-step
        warning: see worker_group), one at a time, as the multi-process executor does."""
        for pid, started in zip(self.rank_pids, self.rank_start_times):
            # A rank that has ended is skipped: its pid may be another process's now (the
            # ranks are no children of the agent's), which the signal would end.
            if started is not None and not still_running(pid, started):
                continue
            with contextlib.suppress(OSError):  # ended since
                os.kill(pid, DUMP_STACKS_SIGNAL)
            time.sleep(STACKS_GAP_S)

    def run_until_closed(self, stopped_limit_s: float) -> list[tuple[int, float]]:
        """Returns when the agent closes (nothing), or once ranks of this node have stayed
        stopped for `stopped_limit_s` (executor.stopped_workers): (place in the node's
        order, seconds stopped) of each. The executor watches it to notice the agent's
        (or its node's) death, or such a stop."""
        stopped = StoppedWorkers(stopped_limit_s)
        while not self.closed.wait(WATCH_POLL_S):
            stalled = stopped.poll(self.rank_pids)
            if stalled:
                return stalled
        return []

    def release_rings(self, ranks: list[tuple[int, str | None]], timeout: float
                      ) -> list[str]:
        """At shutdown, once the executor has killed this node's ranks (`ranks`: the pid and
        start time of each): close this agent's rings, wait up to `timeout` seconds for
        the ranks to end, and remove the rings that dead writers left on this node; the
        names removed. ray.kill skips a ring's unlink, so a rank killed at start, before
        this agent attached its response ring, left that ring's name in /dev/shm until
        the next ring created on the node; the broadcast ring of ranks that never attached
        it is unlinked here by its writer's close."""
        self.close()
        return sweep_when_ended(ranks, timeout)

    def close(self) -> None:
        """Close the rings, waking every waiting call."""
        self.closed.set()
        for condition in (self.sending, self.reading):
            with condition:
                condition.notify_all()
        broadcast = [self.rpc_broadcast_mq] if self.rpc_broadcast_mq else []
        for mq in broadcast + self.worker_response_mqs:
            mq.close()

"""Worker processes that stay stopped (SIGSTOP, SIGTSTP, a terminal's job control).

A stopped worker neither dies nor answers: no sentinel fires, no ring reports its peer
dead, and every step waits on it for ever. The multi-process executor's watcher polls its
workers' states here (a Ray node agent its node's ranks', see ray_worker) and gives the
engine up once one has stayed stopped for STOPPED_LIMIT_S, naming it, so that a step
raises EngineDeadError in bounded time.

Only the state "T" (stopped by a signal) counts; "t" (held by a debugger) does not. A
whole job stopped at a terminal (Ctrl-Z stops the engine's process with its workers)
never counts either: the watcher was stopped too, and a gap between its polls starts the
count again.
"""

from __future__ import annotations

import time

from shardline.executor.proc_stat import stat_fields

STOPPED_LIMIT_S = 10.0
POLL_GAP_S = 3.0  # a longer gap between polls means this process was stopped or starved


def process_state(pid: int) -> str | None:
    """The state letter of process `pid` (R, S, D, T, t, Z, ...); None once it is gone."""
    fields = stat_fields(pid)
    return None if fields is None else fields[0]


def describe_stopped(who: str, seconds: float) -> str:
    """The EngineDeadError's words for worker `who` ("worker rank R (pid P)") stopped
    for `seconds`."""
    return (f"{who} has been stopped (SIGSTOP, SIGTSTP or a terminal's job control) for "
            f"{seconds:.1f} s, and the engine cannot step without it")


class StoppedWorkers:
    """Since when each worker has been seen stopped, over a watcher's successive polls;
    `limit_s` is how long one may stay stopped (STOPPED_LIMIT_S unless given)."""

    def __init__(self, limit_s: float | None = None) -> None:
        self.limit_s = STOPPED_LIMIT_S if limit_s is None else limit_s
        self._since: dict[int, float] = {}
        self._last_poll: float | None = None

    def poll(self, pids: list[int]) -> list[tuple[int, float]]:
        """(index in `pids`, seconds stopped) of the workers seen stopped on every poll
        for `limit_s` or longer."""
        now = time.monotonic()
        if self._last_poll is not None and now - self._last_poll > POLL_GAP_S:
            self._since.clear()
        self._last_poll = now
        stalled = []
        for index, pid in enumerate(pids):
            if process_state(pid) != "T":
                self._since.pop(index, None)
                continue
            stopped_for = now - self._since.setdefault(index, now)
            if stopped_for >= self.limit_s:
                stalled.append((index, stopped_for))
        return stalled

"""What multi-process tests check after themselves: no process left running, no
shared-memory segment left in /dev/shm. Both hold on a machine shared with other test runs,
whose processes and segments are not counted.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import psutil


def shm_entries() -> set[str]:
    """Every name in /dev/shm: shardline's segments and any other, such as the named
    semaphores of multiprocessing's queues and locks (sem.mp-*)."""
    return set(os.listdir("/dev/shm"))


def shm_segments() -> set[str]:
    return {name for name in shm_entries() if name.startswith("shardline-")}


def _mapped_by_a_process(name: str) -> bool:
    path = f"/dev/shm/{name}"
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/maps") as maps:
                if path in maps.read():
                    return True
        except OSError:
            pass
    return False


def leaked_segments(before: set[str], listed: Callable[[], set[str]] = shm_segments
                    ) -> set[str]:
    """Names `listed` (shardline's segments unless told) made since `before` that no
    process maps any more: left behind. (Another test run on this machine may make
    segments meanwhile; its processes map them.)"""
    return {name for name in listed() - before if not _mapped_by_a_process(name)}


def live_children() -> dict[int, str]:
    """This process's live descendants, except multiprocessing's resource tracker (started
    once per process, on first use, and kept for its lifetime)."""
    found = {}
    for child in psutil.Process().children(recursive=True):
        try:
            if child.status() == psutil.STATUS_ZOMBIE:
                continue
            cmdline = " ".join(child.cmdline())
        except psutil.NoSuchProcess:
            continue
        if "multiprocessing.resource_tracker" not in cmdline:
            found[child.pid] = cmdline
    return found


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def assert_gone(pids: list[int]) -> None:
    alive = [pid for pid in pids if _running(pid)]
    assert not alive, f"processes {alive} are still running"


def wait_gone(pids: list[int], timeout: float) -> float:
    """Seconds until none of `pids` runs, polled every 5 ms; `timeout` if some still do
    then (check with assert_gone)."""
    import time

    start = time.monotonic()
    while any(_running(pid) for pid in pids):
        if time.monotonic() - start >= timeout:
            return timeout
        time.sleep(0.005)
    return time.monotonic() - start


def kill_while_stepping(llm, pid: int, dead: str, timeout: float = 60.0) -> float:
    """SIGKILL `pid` from another thread while `llm` runs its fifth step from here (its
    requests must outlast that), and step until EngineDeadError matching `dead` ends it.
    Returns the seconds from the kill to the error."""
    import itertools
    import re
    import signal
    import threading
    import time

    from shardline.executor import EngineDeadError

    go, killed_at = threading.Event(), []

    def kill() -> None:
        go.wait()
        if killed_at == [None]:
            return  # stepping ended before the kill was due
        killed_at.append(time.monotonic())
        os.kill(pid, signal.SIGKILL)

    killer = threading.Thread(target=kill)
    killer.start()
    deadline = time.monotonic() + timeout
    try:
        for step in itertools.count(1):
            assert time.monotonic() < deadline, f"no EngineDeadError within {timeout} s"
            assert llm.has_unfinished_requests(), "generation ended before the kill"
            if step == 5:
                go.set()   # the killer runs once this thread waits inside the step
            llm.step()
    except EngineDeadError as exc:
        assert killed_at, f"{exc!r} came before the kill"
        assert re.search(dead, str(exc)), f"{exc!r} does not match {dead!r}"
        raised_at = time.monotonic()
    finally:
        if not go.is_set():
            killed_at.append(None)
            go.set()
        killer.join()
    return raised_at - killed_at[0]

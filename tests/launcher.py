"""Child processes for multi-process tests: always the spawn start method, and never a hang.

Targets must be importable module-level functions (spawn pickles them by name).
"""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Callable, Iterable
from multiprocessing.process import BaseProcess

import pytest

SPAWN = multiprocessing.get_context("spawn")

FORKS_ON_PURPOSE = pytest.mark.filterwarnings(
    "ignore:This process .* is multi-threaded, use of fork:DeprecationWarning")
"""For the few tests that fork by design (a lambda target, a forked copy of a ring end):
Python 3.12 warns on every fork of a process with threads, which pytest's are."""


def spawn(target: Callable[..., object], *args: object) -> BaseProcess:
    """Start `target(*args)` in a fresh spawned daemon process (killed if the test run dies)."""
    proc = SPAWN.Process(target=target, args=args, daemon=True)
    proc.start()
    return proc


def join_all(procs: Iterable[BaseProcess], timeout: float) -> None:
    """Wait up to `timeout` seconds in total for every process to exit with code 0.

    Processes still alive at the deadline are killed; then an AssertionError names every
    process that timed out or exited with a non-zero code.
    """
    procs = list(procs)
    deadline = time.monotonic() + timeout
    for proc in procs:
        proc.join(max(0.0, deadline - time.monotonic()))
    stragglers = [proc for proc in procs if proc.is_alive()]
    for proc in stragglers:
        proc.kill()
        proc.join(5)
    failures = [
        f"{proc.name} (pid {proc.pid}) still running after {timeout} s"
        for proc in stragglers
    ]
    failures += [
        f"{proc.name} (pid {proc.pid}) exited with code {proc.exitcode}"
        for proc in procs
        if proc not in stragglers and proc.exitcode != 0
    ]
    assert not failures, "child processes failed: " + "; ".join(failures)

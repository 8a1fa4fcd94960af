"""Child-process bodies of tests/distributed/test_shm_collectives.py: members of one
shared-memory collective group that use numpy buffers (no torch import, fast to spawn).

Spawned children import this module by name, so everything here is module-level.
"""

from __future__ import annotations

import os
import time
from multiprocessing.queues import Queue

import numpy as np

from shardline._shm import PeerDied, RingClosed, ShmCollectives

TIMEOUT = 30.0
ELEMENTS = 256


def join_group(rank: int, n_ranks: int, names: Queue, buffer_bytes: int = 4096) -> ShmCollectives:
    """Rank 0 creates the group and hands its name to the others, who attach."""
    if rank == 0:
        group = ShmCollectives.create(n_ranks, buffer_bytes)
        for _ in range(n_ranks - 1):
            names.put(group.name)
    else:
        group = ShmCollectives.attach(names.get(timeout=TIMEOUT), rank)
    return group


def member(rank: int, n_ranks: int, names: Queue, events: Queue, behaviour: str,
           elements: int = ELEMENTS, timeout: float = TIMEOUT) -> None:
    """Joins, runs three all-reduces with everyone, reports ("ready", rank, pid), then:
    "idle" sleeps until killed; "reduce" runs one more all-reduce of `elements` float32
    with `timeout` and reports (outcome, rank, monotonic time it ended), then runs
    another one to report how a call after a failure ends."""
    group = join_group(rank, n_ranks, names)
    group.wait_attached(timeout=TIMEOUT)
    x = np.ones(ELEMENTS, np.float32)
    for _ in range(3):
        group.all_reduce(x.ctypes.data, x.size, "float32", TIMEOUT)
    events.put(("ready", rank, os.getpid()))
    if behaviour == "idle":
        time.sleep(TIMEOUT)
        return
    for _ in range(2):
        y = np.ones(elements, np.float32)
        try:
            group.all_reduce(y.ctypes.data, y.size, "float32", timeout)
            outcome = "completed"
        except (PeerDied, RingClosed, TimeoutError, ValueError) as error:
            outcome = f"{type(error).__name__}: {error}"
        events.put((outcome, rank, time.monotonic()))
    group.close()


def never_attaching(lifetime: float) -> None:
    """A rank that dies before it attaches."""
    time.sleep(lifetime)

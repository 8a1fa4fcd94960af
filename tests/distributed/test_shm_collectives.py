"""The shared-memory collectives: results against gloo's, a dead or stuck peer ends every
wait with an error instead of a hang, and the segment follows the rings' hygiene rules."""

from __future__ import annotations

import os
import re
import signal
import stat
import time

import numpy as np
import pytest
from launcher import SPAWN, join_all, spawn
from shm_workers import TIMEOUT, member, never_attaching

from shardline._shm import PeerDied, Ring, RingClosed, ShmCollectives, sweep_orphans
from shardline.distributed.grid import RankGrid


def shm_path(name: str) -> str:
    return "/dev/shm" + name


@pytest.mark.parametrize("world", [2, 4])
def test_all_reduce_and_all_gather_match_gloo(run_world, fresh_seed, world):
    """Sizes: one element, an odd size, and one that needs three pieces of a 512 KiB
    buffer, two of them reduced in two steps at 4 ranks. Tolerance: see the check."""
    run_world(RankGrid(tp=world), "check_shm_matches_gloo", fresh_seed, (1, 1001, 300_001),
              shm_buffer_bytes=512 * 1024)


class Members:
    """Ranks of one group running shm_workers.member, and what they report."""

    def __init__(self, behaviours: list[str], *args: object):
        names, self.events = SPAWN.Queue(), SPAWN.Queue()
        self.procs = [spawn(member, rank, len(behaviours), names, self.events, behaviour, *args)
                      for rank, behaviour in enumerate(behaviours)]
        self.pids: dict[int, int] = {}
        self.outcomes: dict[int, list[tuple[str, float]]] = {}
        while len(self.pids) < len(behaviours):
            self.receive()

    def receive(self) -> None:
        kind, rank, value = self.events.get(timeout=TIMEOUT)
        if kind == "ready":
            self.pids[rank] = value
        else:
            self.outcomes.setdefault(rank, []).append((kind, value))

    def wait_outcomes(self, ranks: list[int]) -> dict[int, list[tuple[str, float]]]:
        """Both outcomes (see member) of each of `ranks`."""
        while any(len(self.outcomes.get(rank, [])) < 2 for rank in ranks):
            self.receive()
        return self.outcomes


def test_a_peer_killed_mid_collective_raises_within_a_second():
    group = Members(["reduce", "reduce", "idle"])
    time.sleep(0.3)  # the others are asleep in the all-reduce, waiting for rank 2
    killed_at = time.monotonic()
    os.kill(group.pids[2], signal.SIGKILL)
    found = group.wait_outcomes([0, 1])
    join_all(group.procs[:2], TIMEOUT)
    group.procs[2].join(TIMEOUT)
    for rank in (0, 1):
        (first, ended), (second, _) = found[rank]
        assert first.startswith(f"PeerDied: all_reduce: rank 2 (pid {group.pids[2]})"), first
        assert ended - killed_at < 1.0, f"rank {rank} noticed after {ended - killed_at:.2f} s"
        assert second.startswith("RingClosed: all_reduce") and "unusable" in second, second


def test_a_stuck_peer_ends_in_a_timeout_and_a_mismatch_is_named():
    group = Members(["reduce", "idle"], 256, 0.3)
    (first, _), (second, _) = group.wait_outcomes([0])[0]
    assert first.startswith("TimeoutError: all_reduce: timed out"), first
    assert "unusable after an earlier failure" in second, second
    for proc in group.procs:
        proc.kill()
        proc.join(TIMEOUT)

    names, events = SPAWN.Queue(), SPAWN.Queue()
    procs = [spawn(member, rank, 2, names, events, "reduce", elements)
             for rank, elements in ((0, 256), (1, 128))]
    firsts = {}
    while len(firsts) < 2:
        kind, rank, _ = events.get(timeout=TIMEOUT)
        if kind != "ready":
            firsts.setdefault(rank, kind)
    join_all(procs, TIMEOUT)
    for first in firsts.values():
        assert re.match(r"ValueError: all_reduce: rank \d runs all_reduce of (256|128) float32 "
                        r"elements but rank \d runs all_reduce of (128|256) float32", first), first


def test_segment_is_private_named_like_a_ring_and_unlinked_once_all_attached():
    with ShmCollectives.create(2, 4096) as creator:
        path = shm_path(creator.name)
        assert re.fullmatch(r"/shardline-[0-9a-f]{32}", creator.name)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        with pytest.raises(ValueError, match="inconsistent ring geometry"):
            Ring.attach(creator.name, 0)
        with ShmCollectives.attach(creator.name, 1) as other:
            assert not os.path.exists(path)
            creator.wait_attached(timeout=1)
            other.wait_attached(timeout=1)
    with Ring.create(1, 4, 64) as ring, pytest.raises(ValueError, match="not a shardline shared-memory"):
        ShmCollectives.attach(ring.name, 1)


def test_segment_of_a_group_that_never_filled_is_removed():
    """By the creator's close() when a rank died before attaching, and by the sweep when
    the creator itself was killed first."""
    late = spawn(never_attaching, 0.2)
    with ShmCollectives.create(2, 4096) as creator:
        with pytest.raises(PeerDied, match=rf"rank 1 \(pid {late.pid}\) died before it attached"):
            creator.wait_attached(timeout=TIMEOUT, pids=[os.getpid(), late.pid])
        with pytest.raises(RingClosed, match="unusable after an earlier failure"):
            creator.all_reduce(0, 0, "float32", 1)
    assert not os.path.exists(shm_path(creator.name))
    late.join(TIMEOUT)

    names, events = SPAWN.Queue(), SPAWN.Queue()
    creator = spawn(member, 0, 2, names, events, "reduce")
    name = names.get(timeout=TIMEOUT)
    creator.kill()
    creator.join(TIMEOUT)
    assert os.path.exists(shm_path(name))
    assert name in sweep_orphans()
    assert not os.path.exists(shm_path(name))


def test_arguments_are_checked():
    with pytest.raises(ValueError, match=r"n_ranks must be in \[2, 64\], got 1"):
        ShmCollectives.create(1, 4096)
    with pytest.raises(ValueError, match="buffer_bytes must be a multiple of 64, got 100"):
        ShmCollectives.create(2, 100)
    with ShmCollectives.create(2, 4096) as group:
        with pytest.raises(ValueError, match="dtype 'uint8' is not supported .* float32"):
            group.all_reduce(1, 1, "uint8")
        with pytest.raises(ValueError, match="data is a null address for 8 bytes"):
            group.all_reduce(0, 2, "float32")
        with pytest.raises(ValueError, match="timeout must be None or a number of seconds >= 0"):
            group.all_reduce(np.zeros(1, np.float32).ctypes.data, 1, "float32", -1.0)
        with pytest.raises(ValueError, match=r"pids must list one process id per rank \(2\)"):
            group.wait_attached(1, [os.getpid()])

"""A Ray start cut short leaves no shared-memory ring in /dev/shm (the Ray side of
9d685cc, the multi-process executor's sweep of the rings of dead writers).

A rank actor creates its response ring when it starts; the node agent attaches it, then
creates the node's broadcast ring, which every rank attaches in its serving loop. A name
stays in /dev/shm until every reader has attached, and the executor ends the actors with
ray.kill, which skips the unlink. So a rank killed once its ring exists, before it
attached the broadcast ring, left the broadcast ring (or, where the driver's start was cut
short before the agent attached them, the ranks' response rings), and an agent killed
before the ranks attached its broadcast ring left that ring, until the next ring created
on the machine.

Ray runs locally on this machine, one node, as in test_ray_corrupt_frames.py.
"""

from __future__ import annotations

import os
import random
import signal

import pytest

ray = pytest.importorskip("ray", reason="Ray is not installed: pip install 'shardline[ray]'")

from shardline.executor import EngineDeadError  # noqa: E402
from shardline.executor.ray import RayExecutor  # noqa: E402
from multiproc_helpers import make_config  # noqa: E402
from process_hygiene import leaked_segments, shm_segments  # noqa: E402
from test_ray import wait_gone  # noqa: E402


class _Interrupted(BaseException):
    """Stands in for the signal that cuts the driver's start short (serve's SIGTERM)."""


def _victim(phase: str, replies: list, rng: random.Random) -> int:
    """The pid to kill once the start's `phase` has replied: a random rank's after
    "start", the node agent's after "connect"."""
    if phase == "start":
        return replies[rng.randrange(len(replies))]["pid"]
    (_, agent_pid), = replies
    return agent_pid


@pytest.mark.parametrize("phase, cut_short", [("start", False), ("start", True),
                                              ("connect", True)],
                         ids=["rank-start-fails", "rank-driver-interrupted",
                              "agent-driver-interrupted"])
def test_an_actor_killed_at_start_leaves_no_ring(local_ray, monkeypatch, rng, phase,
                                                 cut_short):
    """An actor is SIGKILLed while rings of the start exist that no reader attached yet:
    a random rank once both ranks' response rings exist, or the node agent once its
    broadcast ring exists. Either the start goes on and fails on the dead rank (the
    broadcast ring never gets all its readers), or the driver is interrupted there (as by
    serve's SIGTERM). After the failed start no ring of the executor is left in
    /dev/shm."""
    before = shm_segments()
    seen: dict[str, list] = {}
    real_get = RayExecutor._get

    def get(executor: RayExecutor, refs: list, step: str) -> list:
        replies = real_get(executor, refs, step)
        seen[step] = replies
        if step == phase:
            pid = _victim(phase, replies, rng)
            os.kill(pid, signal.SIGKILL)
            wait_gone([pid])
            if cut_short:
                raise _Interrupted()
        return replies

    monkeypatch.setattr(RayExecutor, "_get", get)
    config = make_config(tensor_parallel_size=2)
    config.parallel.distributed_executor_backend = "ray"
    with pytest.raises(_Interrupted if cut_short else EngineDeadError):
        RayExecutor(config)
    rings = {info["response"].name for info in seen["start"]}
    rings |= {broadcast.name for broadcast, _ in seen.get("connect", [])}
    wait_gone([info["pid"] for info in seen["start"]]
              + [agent_pid for _, agent_pid in seen.get("connect", [])])
    left = {"/" + name for name in leaked_segments(before)} & rings
    for name in left:  # not to be left behind by a failing run either
        os.unlink("/dev/shm" + name)
    assert not left, f"rings {sorted(left)} of the failed start are still in /dev/shm"

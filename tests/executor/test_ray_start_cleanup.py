"""A Ray start cut short leaves no shared-memory ring in /dev/shm (the Ray side of
9d685cc, the multi-process executor's sweep of the rings of dead writers).

A rank actor creates its response ring once the executor knows its pid (describe after
identify); the node agent attaches the ring, then creates the node's broadcast ring, which
every rank attaches in its serving loop. A name stays in /dev/shm until every reader has
attached, and the executor ends the actors with ray.kill, which skips the unlink. So a
rank killed once its ring exists, before it attached the broadcast ring, left the
broadcast ring (or, where the driver's start was cut short before the agent attached
them, the ranks' response rings), and an agent killed before the ranks attached its
broadcast ring left that ring, until the next ring created on the machine. A start
interrupted before the ranks had told their pids swept at once, while the killed ranks
still ran, and their rings stayed; a rank now makes its ring only once the executor knows
its process, which the sweep waits for.

Ray runs locally on this machine, one node, as in test_ray_corrupt_frames.py.
"""

from __future__ import annotations

import os
import random
import signal
import time

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
    "describe" (its response ring made), the node agent's after "connect"."""
    if phase == "describe":
        return replies[rng.randrange(len(replies))]["pid"]
    (_, agent_pid), = replies
    return agent_pid


@pytest.mark.parametrize("phase, cut_short", [("describe", False), ("describe", True),
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
    rings = {info["response"].name for info in seen["describe"]}
    rings |= {broadcast.name for broadcast, _ in seen.get("connect", [])}
    wait_gone([info["pid"] for info in seen["describe"]]
              + [agent_pid for _, agent_pid in seen.get("connect", [])])
    left = {"/" + name for name in leaked_segments(before)} & rings
    for name in left:  # not to be left behind by a failing run either
        os.unlink("/dev/shm" + name)
    assert not left, f"rings {sorted(left)} of the failed start are still in /dev/shm"


RINGS_DIR_ENV = "SHARDLINE_TEST_RANK_RINGS"
"""Where each rank actor of the interrupted-start test records its pid and its rings
(SHARDLINE_* variables reach the ranks' actors: ray_placement.forwarded_env)."""


def _recording_rank_actor() -> type:
    """RankActor that records every ring it creates, one file per process (named by its
    pid) once its __init__ has returned. Made here so that cloudpickle ships it by value
    and the actors need not import this module."""
    from shardline.executor import ray_worker
    from shardline.executor.ray_worker import RankActor

    class RecordingQueue(ray_worker.MessageQueue):
        @classmethod
        def create(cls, *args, **kwargs):
            queue = super().create(*args, **kwargs)
            with open(os.path.join(os.environ[RINGS_DIR_ENV], f"{os.getpid()}.rings"),
                      "a") as out:
                out.write(queue.handle().name + "\n")
            return queue

    class RecordingRank(RankActor):
        def __init__(self, rank: int, log_level: int) -> None:
            ray_worker.MessageQueue = RecordingQueue  # this actor's own process
            super().__init__(rank, log_level)
            with open(os.path.join(os.environ[RINGS_DIR_ENV], f"{os.getpid()}.pid"), "w"):
                pass

    return RecordingRank


def test_a_start_interrupted_before_the_ranks_answer_leaves_no_ring(local_ray, monkeypatch,
                                                                    tmp_path):
    """The driver is interrupted (as by serve's SIGTERM) at its first wait on the rank
    actors, before any has answered, so it knows none of their pids: both actors have
    finished their __init__ and the node agent is up. Shutdown must not sweep the node
    while a rank may still make or hold a ring: after the ranks have ended, none of the
    rings they made is left. The driver's own sweep (release) is turned off, as for ranks
    on another node than the driver's."""
    from shardline.executor import ray as ray_executor

    monkeypatch.setenv(RINGS_DIR_ENV, str(tmp_path))
    monkeypatch.setattr(ray_executor, "_RankActor", ray.remote(_recording_rank_actor()))
    monkeypatch.setattr(ray_executor, "sweep_orphans", lambda: [])

    def get(executor: RayExecutor, refs: list, step: str) -> list:
        ray.get([agent.__ray_ready__.remote() for agent in executor._group.agents])
        deadline = time.monotonic() + 60
        while len(list(tmp_path.glob("*.pid"))) < len(executor._group.ranks):
            assert time.monotonic() < deadline, "the rank actors did not start in 60 s"
            time.sleep(0.01)
        raise _Interrupted()

    monkeypatch.setattr(RayExecutor, "_get", get)
    config = make_config(tensor_parallel_size=2)
    config.parallel.distributed_executor_backend = "ray"
    with pytest.raises(_Interrupted):
        RayExecutor(config)
    wait_gone([int(path.stem) for path in tmp_path.glob("*.pid")])
    rings = {name for path in tmp_path.glob("*.rings") for name in path.read_text().split()}
    left = {name for name in rings if os.path.exists("/dev/shm" + name)}
    for name in left:  # not to be left behind by a failing run either
        os.unlink("/dev/shm" + name)
    assert not left, f"rings {sorted(left)} of the interrupted start are still in /dev/shm"

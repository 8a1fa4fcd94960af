"""A corrupt frame on a Ray node's rings fails the Ray executor as it fails the
multi-process one (tests/executor/test_corrupt_frames.py): a reply its node agent cannot
read kills the engine naming the rank and its response ring; a rank that cannot read a
call from the node's broadcast ring is named with that ring. No call hangs, later calls
raise EngineDeadError, and shutdown leaves no actor process and nothing in /dev/shm.

Ray runs locally on this machine, one node (the two-node cluster of test_ray.py costs
more to start and adds nothing here: a node agent reads its own node's rings).
"""

from __future__ import annotations

import time

import pytest

ray = pytest.importorskip("ray", reason="Ray is not installed: pip install 'shardline[ray]'")

from shardline.executor import EngineDeadError  # noqa: E402
from shardline.executor.ray import RayExecutor  # noqa: E402
from process_hygiene import leaked_segments, shm_segments  # noqa: E402
from test_corrupt_frames import CALL_TIMEOUT_S, KINDS  # noqa: E402
from multiproc_helpers import make_config, step  # noqa: E402
from test_ray import wait_gone  # noqa: E402


def start() -> RayExecutor:
    config = make_config("CorruptingWorker", tensor_parallel_size=2)
    config.parallel.distributed_executor_backend = "ray"
    return RayExecutor(config)


def shut_down_clean(executor: RayExecutor, before: set[str]) -> None:
    pids = executor.worker_pids
    executor.shutdown()
    wait_gone(pids)
    assert not leaked_segments(before)


def test_a_corrupt_reply_kills_the_engine_naming_the_rank_and_its_ring(local_ray, rng):
    before = shm_segments()
    executor = start()
    try:
        kind = rng.choice(list(KINDS))
        call = rng.choice(["collective_rpc", "execute_model"])
        # execute_model is answered by the output rank alone; collective_rpc by both
        rank = rng.randrange(2) if call == "collective_rpc" else executor.output_rank
        # The ranks' response rings as the node's agent (a threaded actor) reads them
        (agent,) = executor._group.agents
        ring = ray.get(agent.__ray_call__.remote(
            lambda agent: agent.worker_response_mqs[rank].handle().name))
        executor.collective_rpc("corrupt_reply", args=(rank, kind, 1), timeout=CALL_TIMEOUT_S)
        started = time.monotonic()
        with pytest.raises(EngineDeadError, match=rf"could not read a reply of worker rank "
                                                  rf"{rank} from its response ring '{ring}': "
                                                  rf".*{KINDS[kind]}"):
            if call == "collective_rpc":
                executor.collective_rpc("identity", timeout=CALL_TIMEOUT_S)
            else:
                executor.execute_model(step("a"))
        assert time.monotonic() - started < 5.0
        with pytest.raises(EngineDeadError, match=rf"worker rank {rank}"):
            executor.execute_model(step("after"))
    finally:
        shut_down_clean(executor, before)


def test_a_rank_that_cannot_read_a_call_is_named_with_the_broadcast_ring(local_ray, rng):
    """The rank replies that it could not read the call and exits with code 3: the call
    fails naming it and the ring, whether the agent returns the rank's report or the
    watcher sees the exit first."""
    before = shm_segments()
    executor = start()
    try:
        rank = rng.randrange(2)
        kind = rng.choice(list(KINDS))
        (agent,) = executor._group.agents
        ring = ray.get(agent.__ray_call__.remote(
            lambda agent: agent.rpc_broadcast_mq.handle().name))
        executor.collective_rpc("corrupt_next_call", args=(rank, kind), timeout=CALL_TIMEOUT_S)
        started = time.monotonic()
        with pytest.raises(EngineDeadError, match=rf"worker rank {rank} .*could not read a "
                                                  rf"call from the broadcast ring '{ring}'"):
            executor.collective_rpc("identity", timeout=CALL_TIMEOUT_S)
        assert time.monotonic() - started < 5.0
        with pytest.raises(EngineDeadError, match=rf"worker rank {rank}"):
            executor.execute_model(step("after"))
    finally:
        shut_down_clean(executor, before)

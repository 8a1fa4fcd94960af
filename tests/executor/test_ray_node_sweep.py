"""Shutdown sweeps the node of a dead node agent from that node (ray_placement.sweep_nodes).

A node agent that dies before its ranks attached its broadcast ring leaves the ring's name
in its node's /dev/shm (ray.kill and death skip the unlink). The driver sweeps only its own
machine and a dead agent sweeps nothing, so a task pinned to the agent's node has to. Here
the nodes of a ray.cluster_utils.Cluster share one machine, and so one /dev/shm: the test
checks where the sweep ran (its node id), not only that the ring is gone.
"""

from __future__ import annotations

import os
import signal

import pytest

ray = pytest.importorskip("ray", reason="Ray is not installed: pip install 'shardline[ray]'")

from shardline.executor import ray as ray_executor  # noqa: E402
from shardline.executor.ray import RayExecutor  # noqa: E402
import test_ray  # noqa: E402
from multiproc_helpers import make_config  # noqa: E402
from test_ray import wait_gone  # noqa: E402

# test_ray's two-node cluster (one per module) and its wait for the previous test's CPUs.
cluster = test_ray.cluster
_cluster_idle = test_ray._cluster_idle


class _Interrupted(BaseException):
    """Stands in for the signal that cuts the driver's start short (serve's SIGTERM)."""


def test_the_node_of_a_dead_agent_is_swept_by_a_task_there(cluster, monkeypatch, rng):
    """PP2 over the cluster's two worker nodes: one rank and one node agent on each. A
    random agent is SIGKILLed once it has made its node's broadcast ring (connect), and
    the driver is interrupted there, so no rank attached that ring. Shutdown sweeps the
    dead agent's node by a task that ran there (its node id), and on no other node (the
    live agent sweeps its own); the ring is gone. The driver's sweep of its own machine
    is off: here it shares the machine with the nodes."""
    swept: dict[str, list[str]] = {}
    real_sweep_nodes = ray_executor.sweep_nodes

    def sweep_nodes(nodes: list[str], ranks: list, timeout: float) -> dict[str, list[str]]:
        done = real_sweep_nodes(nodes, ranks, timeout)
        swept.update(done)
        return done

    monkeypatch.setattr(ray_executor, "sweep_nodes", sweep_nodes)
    monkeypatch.setattr(ray_executor, "sweep_orphans", lambda: [])
    seen: dict = {}
    real_get = RayExecutor._get

    def get(executor: RayExecutor, refs: list, step: str) -> list:
        replies = real_get(executor, refs, step)
        if step == "connect":
            victim = rng.randrange(len(replies))
            broadcast, pid = replies[victim]
            seen.update(node=executor._group.agent_nodes[victim], ring=broadcast.name,
                        agents=[agent_pid for _, agent_pid in replies])
            os.kill(pid, signal.SIGKILL)
            wait_gone([pid])
            raise _Interrupted()
        return replies

    monkeypatch.setattr(RayExecutor, "_get", get)
    config = make_config(pipeline_parallel_size=2)
    config.parallel.distributed_executor_backend = "ray"
    with pytest.raises(_Interrupted):
        RayExecutor(config)
    wait_gone(seen["agents"])
    left = os.path.exists("/dev/shm" + seen["ring"])
    if left:  # not to be left behind by a failing run either
        os.unlink("/dev/shm" + seen["ring"])
    assert seen["node"] in cluster and seen["node"] != ray.get_runtime_context().get_node_id()
    assert list(swept) == [seen["node"]], (
        f"the dead agent's node {seen['node']} was not swept from there alone: {swept}")
    assert not left, f"the dead agent's ring {seen['ring']} is still in /dev/shm"

"""Where the Ray executor's ranks run: the Ray session, the placement group and the
rendezvous address of one torch.distributed world.

The world's ranks are reserved as one placement group with one bundle per TP x SP block
(the contiguous ranks of one pipeline stage of one data-parallel replica). A bundle
always lies on one node, so every TP and SP group stays inside a node, on its fastest
links; the SPREAD strategy spreads the blocks, and so the pipeline stages and the
replicas, over the nodes.

Under data parallelism every engine core has an executor of its own, but all of them
share one world: the executors find it by the `distributed_init_method` the caller gives
them all (a key here, not an address: the ranks meet at rank 0's node, on a port a probe
found free there), and the last one to let go of it removes the placement group. Ray
itself, if this process started it, stops with the last executor (`disconnect`).

A node whose agent died is swept at shutdown by a task pinned to it (`sweep_nodes`).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from collections import Counter

import ray
from ray.util.placement_group import (PlacementGroup, placement_group, placement_group_table,
                                      remove_placement_group)
from ray.exceptions import RayError
from ray.util.scheduling_strategies import (NodeAffinitySchedulingStrategy,
                                            PlacementGroupSchedulingStrategy)

from shardline.config import ParallelConfig
from shardline.executor.ray_worker import sweep_when_ended

logger = logging.getLogger("shardline")

PLACEMENT_TIMEOUT_S = 120.0
FORWARDED_ENV_PREFIXES = ("NCCL_", "GLOO_", "TORCH_NCCL_", "SHARDLINE_")
"""Environment variables set in the driver with these prefixes reach every rank's actor."""

_lock = threading.Lock()
_worlds: dict[str, "RayWorld"] = {}
_session = {"users": 0, "started_here": False}


def connect(address: str | None, num_cpus: int) -> None:
    """Join the Ray cluster at `address` (or RAY_ADDRESS), start a local one if neither is
    set, or keep the connection this process already has; every call needs a `disconnect`.
    A local cluster gets at least `num_cpus` CPUs, since CPU ranks share the cores as under
    the multi-process executor."""
    with _lock:
        if not ray.is_initialized():
            if address is None and not os.environ.get("RAY_ADDRESS"):
                # "local": a new cluster even where one runs on this machine already, which
                # ray.init() would join (and refuse num_cpus for).
                ray.init(address="local", num_cpus=max(os.cpu_count() or 1, num_cpus),
                         include_dashboard=False)
            else:
                ray.init(address=address)
            _session["started_here"] = True
        _session["users"] += 1


def disconnect() -> None:
    """Undo one `connect`; the last one calls ray.shutdown if `connect` called ray.init
    (closing the connection, and stopping a local Ray it started)."""
    with _lock:
        _session["users"] -= 1
        if _session["users"] == 0 and _session["started_here"]:
            _session["started_here"] = False
            ray.shutdown()


def _node_address() -> tuple[str, int]:
    """This node's IP address and a TCP port free on it (runs in rank 0's bundle)."""
    ip = ray.util.get_node_ip_address()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return ip, sock.getsockname()[1]


def forwarded_env() -> dict[str, str]:
    """The driver's NCCL_*, GLOO_*, TORCH_NCCL_* and SHARDLINE_* variables."""
    return {key: value for key, value in os.environ.items()
            if key.startswith(FORWARDED_ENV_PREFIXES)}


def ray_device(parallel_device: str | None) -> str:
    """"cpu" or "cuda": asked for, else SHARDLINE_DEVICE's type, else CUDA if the
    cluster has GPUs."""
    requested = parallel_device or os.environ.get("SHARDLINE_DEVICE")
    if requested:
        return requested.split(":")[0]
    return "cuda" if ray.cluster_resources().get("GPU", 0) > 0 else "cpu"


def ranks_sharing_node(rank_nodes: list[str]) -> list[int]:
    """For each rank of the world (`rank_nodes`: the node of each, in rank order), how
    many ranks its node holds: the ranks that split that node's cores."""
    per_node = Counter(rank_nodes)
    return [per_node[node] for node in rank_nodes]


class RayWorld:
    """The placement group of every rank of the world (all data-parallel replicas) and
    the address where the ranks rendezvous. Shared by the executors of one world; use
    `acquire` and `release`."""

    def __init__(self, parallel: ParallelConfig, device_type: str) -> None:
        self.block_size = parallel.tensor_parallel_size * parallel.sequence_parallel_size
        self.device_type = device_type
        blocks = parallel.world_size // self.block_size
        per_rank = {"CPU": 1.0, "GPU": 1.0} if device_type == "cuda" else {"CPU": 1.0}
        self.bundle = {key: value * self.block_size for key, value in per_rank.items()}
        self.users = 0
        self.key: str | None = None
        self.pg: PlacementGroup = placement_group(
            [dict(self.bundle)] * blocks, strategy="SPREAD",
            name=f"shardline-{uuid.uuid4().hex[:8]}")
        try:
            ready, _ = ray.wait([self.pg.ready()], timeout=PLACEMENT_TIMEOUT_S)
            if not ready:
                raise RuntimeError(
                    f"the Ray cluster could not reserve {blocks} bundles of {self.bundle} "
                    f"(one per TP x SP block of {self.block_size} ranks) within "
                    f"{PLACEMENT_TIMEOUT_S:.0f} s; it has {ray.cluster_resources()} in all "
                    f"and {ray.available_resources()} free")
            self.bundle_nodes: dict[int, str] = placement_group_table(self.pg)["bundles_to_node_id"]
            probe = ray.remote(num_cpus=0)(_node_address).options(
                scheduling_strategy=self.strategy(0))
            self._address_ref = probe.remote()
        except BaseException:
            remove_placement_group(self.pg)
            raise
        self._address: str | None = None
        logger.info("Ray placement: %d bundles of %s on nodes %s", blocks, self.bundle,
                    sorted(set(self.bundle_nodes.values())))

    @property
    def address(self) -> str:
        """Where the ranks rendezvous: rank 0's node and a port free there (asked for when
        the world is made, and read on first use, so the probe overlaps other work)."""
        if self._address is None:
            ip, port = ray.get(self._address_ref, timeout=PLACEMENT_TIMEOUT_S)
            host = f"[{ip}]" if ":" in ip else ip
            self._address = f"tcp://{host}:{port}"
        return self._address

    @classmethod
    def acquire(cls, parallel: ParallelConfig, device_type: str, key: str | None
                ) -> "RayWorld":
        """The world named `key` if an executor holds it, else a new one; None as `key`
        always makes a new one. Needs a connection to Ray (`connect`)."""
        with _lock:
            world = _worlds.get(key) if key is not None else None
            if world is None:
                world = cls(parallel, device_type)
                if key is not None:
                    world.key = key
                    _worlds[key] = world
            world.users += 1
            return world

    def release(self) -> None:
        """Let go of the world; the last user removes the placement group."""
        with _lock:
            self.users -= 1
            if self.users > 0:
                return
            if self.key is not None:
                _worlds.pop(self.key, None)
            try:
                remove_placement_group(self.pg)
            except Exception as exc:  # Ray already gone (interpreter exit)
                logger.debug("removing the placement group failed: %s", exc)

    def strategy(self, rank: int) -> PlacementGroupSchedulingStrategy:
        """Where rank `rank`'s actor goes: its block's bundle."""
        return PlacementGroupSchedulingStrategy(
            self.pg, placement_group_bundle_index=rank // self.block_size)

    def node_of(self, rank: int) -> str:
        """The Ray node id that holds rank `rank`."""
        return self.bundle_nodes[rank // self.block_size]


def _sweep_node(ranks: list[tuple[int, str | None]], timeout: float
                ) -> tuple[str, list[str]]:
    """On one node (a task pinned there): wait up to `timeout` seconds for the node's
    killed ranks (`ranks`: pid and start time of each) to end, then remove the rings of
    dead writers (ray_worker.sweep_when_ended); the node id this ran on and the names
    removed."""
    return ray.get_runtime_context().get_node_id(), sweep_when_ended(ranks, timeout)


_node_sweep = ray.remote(num_cpus=0, max_retries=0)(_sweep_node)


def sweep_nodes(nodes: list[str], ranks: list[list[tuple[int, str | None]]], timeout: float
                ) -> dict[str, list[str]]:
    """At shutdown, sweep `nodes` (Ray node ids whose agent died) by a task pinned to each
    (no CPU, no retry): a dead agent's broadcast ring that its ranks never attached stays
    in its node's /dev/shm until the next ring created there, and only a process on that
    node can remove it. Each task first waits up to `timeout` seconds for its node's
    killed ranks (`ranks`, one list per node) to end; the tasks get twice that in all,
    and a node that is gone itself is skipped. The rings removed, by the node each task
    ran on."""
    alive = {node["NodeID"] for node in ray.nodes() if node["Alive"]}
    refs = [_node_sweep.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
                node, soft=False)).remote(node_ranks, timeout)
            for node, node_ranks in zip(nodes, ranks) if node in alive]
    done, _ = ray.wait(refs, num_returns=len(refs), timeout=2 * timeout)
    swept: dict[str, list[str]] = {}
    for ref in done:
        try:
            node, removed = ray.get(ref)
        except RayError as exc:  # its node died meanwhile
            logger.debug("sweeping the node of a dead node agent failed: %s", exc)
            continue
        swept[node] = removed
        if removed:
            logger.info("removed rings %s that a dead node agent left on node %s",
                        removed, node)
    return swept

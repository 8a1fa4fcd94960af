"""Which ranks share a machine, as far as shared memory is concerned.

Two processes can use the shared-memory collectives only if they see the same /dev/shm
and the same process ids (the collectives watch their peers' pids). A rank's node key
hashes the host name, the boot id, its pid namespace and the device of /dev/shm, so
two containers on one host with private /dev/shm or pid namespaces count as two nodes.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
from collections.abc import Sequence

import torch
import torch.distributed as dist

from shardline.distributed.grid import RankGrid

logger = logging.getLogger(__name__)


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def _inode(path: str) -> str:
    try:
        st = os.stat(path)
    except OSError:
        return ""
    return f"{st.st_dev}:{st.st_ino}"


def node_key() -> int:
    """A 63-bit key equal for exactly the processes that can share a memory segment."""
    parts = (socket.gethostname(), _read("/proc/sys/kernel/random/boot_id"),
             _inode("/proc/self/ns/pid"), _inode("/dev/shm"))
    digest = hashlib.blake2b("\0".join(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def gather_node_ids(cpu_group: dist.ProcessGroup | None, world_size: int) -> list[int]:
    """Every rank's node, numbered 0, 1, ... in order of each node's lowest rank. A
    collective over `cpu_group` (a gloo group of the whole world)."""
    mine = torch.tensor([node_key()], dtype=torch.int64)
    keys = [mine] if world_size == 1 else [torch.empty_like(mine) for _ in range(world_size)]
    if world_size > 1:
        dist.all_gather(keys, mine, group=cpu_group)
    numbering: dict[int, int] = {}
    return [numbering.setdefault(int(key), len(numbering)) for key in keys]


def on_one_node(node_ids: Sequence[int], ranks: Sequence[int]) -> bool:
    """True when every rank of `ranks` is on the same node."""
    return len({node_ids[rank] for rank in ranks}) == 1


def warn_split_groups(grid: RankGrid, node_ids: Sequence[int]) -> None:
    """Logs a warning for each TP or SP group that spans nodes: their collectives run
    every layer and are meant for the fastest links."""
    for kind in ("tp", "sp"):
        for ranks in grid.groups(kind):
            if len(ranks) > 1 and not on_one_node(node_ids, ranks):
                nodes = sorted({node_ids[rank] for rank in ranks})
                logger.warning("the %s group of ranks %s spans nodes %s: its per-layer "
                               "collectives will cross the network; put whole %s groups "
                               "on one node", kind.upper(), ranks, nodes, kind.upper())

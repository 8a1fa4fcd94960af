"""Alpha-beta cost of each collective over a group of ranks placed on a cluster.

A message of B bytes over a link costs alpha + B / beta (latency, per-direction
bandwidth). Per rank, over a group of n ranks:

    ring all-reduce     2 (n-1) alpha + 2 (n-1)/n B / beta      (B: the tensor)
    tree all-reduce     2 ceil(log2 n) alpha + 2 B / beta
    all-gather          (n-1) alpha + (n-1) B / beta            (B: this rank's part)
    reduce-scatter      (n-1) alpha + (n-1)/n B / beta          (B: the whole input)
    all-to-all          (n-1) alpha + max(B_intra / beta_intra, B_inter / beta_inter)
    send/recv           alpha + B / beta

All-reduce takes the cheaper of ring and tree, as NCCL does. A ring or tree whose group
spans nodes runs at the internode link's pace (its slowest hop), and of the bytes a rank
sends, the share on edges that cross nodes (m of the ring's n edges for m nodes) is
counted as internode. An all-to-all sends each peer its part directly: the parts for
peers on other nodes go over the internode link, concurrently with the rest.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from shardline.planner.cluster import ClusterSpec, Link

OPS = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "send")


@dataclass(frozen=True)
class CommCost:
    """Time of one rank's collective calls and the bytes it sends, by link; `calls`
    counts the calls."""

    time_s: float = 0.0
    intranode_bytes: float = 0.0
    internode_bytes: float = 0.0
    intranode_time_s: float = 0.0
    internode_time_s: float = 0.0
    calls: float = 0.0

    def __add__(self, other: CommCost) -> CommCost:
        return CommCost(*(a + b for a, b in zip(self._values(), other._values())))

    def scaled(self, factor: float) -> CommCost:
        return CommCost(*(a * factor for a in self._values()))

    def _values(self) -> tuple[float, ...]:
        return (self.time_s, self.intranode_bytes, self.internode_bytes,
                self.intranode_time_s, self.internode_time_s, self.calls)


def nodes_spanned(ranks: Sequence[int], cluster: ClusterSpec) -> int:
    return len({cluster.node_of(r) for r in ranks})


def _on_link(time_s: float, wire_bytes: float, crossing: float) -> CommCost:
    """One call whose wire bytes are `crossing` (0..1) internode, its time charged to the
    slower link it touches."""
    inter = wire_bytes * crossing
    if crossing:
        return CommCost(time_s, wire_bytes - inter, inter, 0.0, time_s, 1.0)
    return CommCost(time_s, wire_bytes, 0.0, time_s, 0.0, 1.0)


def ring_all_reduce(n: int, nbytes: float, link: Link) -> float:
    return 2 * (n - 1) * link.latency_s + 2 * (n - 1) / n * nbytes / link.bandwidth


def tree_all_reduce(n: int, nbytes: float, link: Link) -> float:
    return 2 * math.ceil(math.log2(n)) * link.latency_s + 2 * nbytes / link.bandwidth


def all_reduce_time(n: int, nbytes: float, link: Link) -> float:
    """The cheaper of ring and tree, as NCCL picks."""
    return min(ring_all_reduce(n, nbytes, link), tree_all_reduce(n, nbytes, link))


def collective_cost(op: str, ranks: Sequence[int], nbytes: float,
                    cluster: ClusterSpec) -> CommCost:
    """One call of `op` by every rank of `ranks`; `nbytes` as in the module's table
    (for all_to_all: what this rank sends to the others, spread evenly over them; for
    send: what it sends to the next rank of `ranks`, a pair)."""
    n = len(ranks)
    if op not in OPS:
        raise ValueError(f"collective op={op!r} is not modelled: use one of {OPS}")
    if n == 1 or nbytes == 0:
        return CommCost()
    m = nodes_spanned(ranks, cluster)
    link = cluster.internode if m > 1 else cluster.intranode
    crossing = m / n if m > 1 else 0.0
    if op == "all_reduce":
        return _on_link(all_reduce_time(n, nbytes, link), 2 * (n - 1) / n * nbytes, crossing)
    if op == "all_gather":
        return _on_link((n - 1) * (link.latency_s + nbytes / link.bandwidth),
                        (n - 1) * nbytes, crossing)
    if op == "reduce_scatter":
        return _on_link((n - 1) * link.latency_s + (n - 1) / n * nbytes / link.bandwidth,
                        (n - 1) / n * nbytes, crossing)
    if op == "send":
        return _on_link(link.latency_s + nbytes / link.bandwidth, nbytes, 1.0 if m > 1 else 0)
    me = ranks[0]
    remote = sum(1 for r in ranks if cluster.node_of(r) != cluster.node_of(me))
    inter = nbytes * remote / (n - 1)
    intra = nbytes - inter
    intra_t = intra / cluster.intranode.bandwidth
    inter_t = inter / cluster.internode.bandwidth
    time_s = (n - 1) * link.latency_s + max(intra_t, inter_t)
    if inter:
        return CommCost(time_s, intra, inter, 0.0, time_s, 1.0)
    return CommCost(time_s, intra, 0.0, time_s, 0.0, 1.0)

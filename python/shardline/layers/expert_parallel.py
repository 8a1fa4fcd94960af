"""Expert parallelism: moving tokens to the ranks that own their experts, and back.

Every rank of the EP group (the DP x SP x TP ranks of one pipeline stage) owns a
contiguous, equal share of each MoE layer's experts, whole (`expert_range`). A rank's
tokens are the same on every rank of its TP group (TP replicates activations) and
differ between DP and SP ranks. Two ways to reach the experts, chosen by
ParallelConfig.expert_dispatch:

all_to_all (`dispatch_all_to_all`). The TP ranks first divide their common tokens: each
takes a contiguous 1/TP share (`token_share`), routes it and sends each token once to
every rank that owns at least one of its top-k experts, with the token's expert ids and
weights in the same row (an all-to-all of uneven splits, after an exchange of the counts). An
owner runs its local experts on what it received; the kernel applies each pair's weight
and sums the owner's pairs of a token, so one row per (token, owner) goes back the same
way. The sender adds the rows of each token, in owner order, in fp32, into the token's
original place, and an all-gather over TP restores every token on every TP rank. The
other division, every TP rank dispatching all of its (replicated) tokens, would send
each token TP times over; the share costs one all-gather of the outputs instead.

all_gather (`dispatch_all_gather`). Every rank gathers every rank's share (tokens, ids,
weights) over the EP group, runs its experts on all of them, and a reduce-scatter
returns to each rank the sum over owners of its own share. When the EP group is the TP
group (DP = SP = 1) every rank already holds every token: the gather is skipped, and
the reduce-scatter plus the TP all-gather are one all-reduce (`layers.moe`).

Bytes each rank sends per step (T tokens on each of n = EP = TP ranks, b bytes per
hidden row, r the mean number of other ranks owning one of a token's experts, with k of
E experts chosen uniformly: r = (n - 1) * (1 - C(E - E/n, k) / C(E, k))):
all_to_all moves 2 r T b / n in the dispatch and combine plus T b (n - 1) / n over
the wire in the all-gather; all_gather (as its all-reduce) 2 T b (n - 1) / n over the
wire. all_to_all wins when r < (n - 1) / 2, i.e. when a token's experts touch fewer
than half of the other ranks: Mixtral's 8 experts top-2 over 8 ranks (r = 1.75: 1.31
T b against 1.75 T b), but not 4 experts top-2 over 2 ranks (r = 0.83: 1.33 T b against
T b); 4 experts top-2 over 4 ranks is a tie (r = 1.5). bench/layouts.py measures both.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from shardline.distributed.parallel_state import GroupCoordinate

ExpertCompute = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""(x [N, H], topk_weights [N, k], topk_ids [N, k] global ids) -> [N, H]: the weighted
sum over this rank's experts of each row; choices of other ranks' experts add nothing."""


def expert_range(num_experts: int, ep_size: int, ep_rank: int) -> range:
    """The global ids of the experts EP rank `ep_rank` owns: an equal contiguous share."""
    if num_experts % ep_size:
        raise ValueError(f"num_experts={num_experts} is not divisible by the expert-parallel "
                         f"size {ep_size}: every rank must own the same number of experts")
    per_rank = num_experts // ep_size
    return range(ep_rank * per_rank, (ep_rank + 1) * per_rank)


def token_share(num_tokens: int, parts: int, index: int) -> slice:
    """Part `index` of `parts` contiguous shares of num_tokens rows: ceil(T / parts) rows
    each, the last non-empty share shorter, any after it empty. Padded to the same length
    and gathered in order, the shares' first num_tokens rows are the tokens in order."""
    size = -(-num_tokens // parts)
    return slice(min(index * size, num_tokens), min((index + 1) * size, num_tokens))


def gather_shares(share: torch.Tensor, num_tokens: int, group: GroupCoordinate) -> torch.Tensor:
    """Every rank's `token_share` rows of `group`, in order: the num_tokens rows."""
    if group.size == 1:
        return share
    size = -(-num_tokens // group.size)
    padded = share.new_zeros(size, *share.shape[1:])
    padded[:share.shape[0]] = share
    return group.all_gather(padded, dim=0)[:num_tokens]


def _with_route(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Each row of x followed by its weights and expert ids as fp32 (ids are small
    integers, exact in fp32), reinterpreted bit for bit as x's dtype so that one
    collective carries all three: [N, H + 8k / x.element_size()]."""
    route = torch.cat([weights.float(), ids.float()], dim=1)
    return torch.cat([x, route.view(x.dtype)], dim=1)


def _without_route(rows: torch.Tensor, hidden: int
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What _with_route packed: (x, weights, ids)."""
    route = rows[:, hidden:].contiguous().view(torch.float32)
    k = route.shape[1] // 2
    return rows[:, :hidden], route[:, :k], route[:, k:].long()


def dispatch_all_to_all(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
                        experts_per_rank: int, ep: GroupCoordinate,
                        compute: ExpertCompute) -> torch.Tensor:
    """sum_k weights[t, k] * expert_{ids[t, k]}(x[t]) for this rank's tokens x [T, H],
    each expert run by the EP rank that owns it (see the module docstring)."""
    tokens, hidden = x.shape
    owner = ids.long() // experts_per_rank
    ranks = torch.arange(ep.size, device=x.device)
    hit = (owner[:, :, None] == ranks).any(dim=1)          # [T, n]: token t goes to rank d
    dest, token = hit.t().nonzero(as_tuple=True)           # by rank, then token order
    send = hit.sum(dim=0).tolist()
    recv = ep.exchange_splits(send)
    got = ep.all_to_all(_with_route(x[token], weights[token], ids[token]), send, recv)
    back = ep.all_to_all(compute(*_without_route(got, hidden)), recv, send)
    # The rows of token t sit in slots 0.. in owner order; summing the slots in order
    # keeps the result independent of the hardware's scatter order.
    slot = (hit.cumsum(dim=1) - 1)[token, dest]
    slots = x.new_zeros(min(ids.shape[1], ep.size), tokens, hidden, dtype=torch.float32)
    slots[slot, token] = back.float()
    return slots.sum(dim=0).to(x.dtype)


def dispatch_all_gather(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
                        ep: GroupCoordinate, compute: ExpertCompute) -> torch.Tensor:
    """The same sum as dispatch_all_to_all, by gathering every rank's tokens over the EP
    group and reduce-scattering the experts' outputs back."""
    tokens, hidden = x.shape
    counts = ep.all_gather(torch.tensor([tokens], dtype=torch.int64), dim=0).tolist()
    rows = max(counts)
    if rows == 0:
        return x
    padding = rows - tokens     # rows of zeros that choose no expert (id -1)
    packed = _with_route(torch.cat([x, x.new_zeros(padding, hidden)]),
                         torch.cat([weights.float(), weights.new_zeros(padding, ids.shape[1])]),
                         torch.cat([ids, ids.new_full((padding, ids.shape[1]), -1)]))
    everyone = ep.all_gather(packed, dim=0)
    return ep.reduce_scatter(compute(*_without_route(everyone, hidden)), dim=0)[:tokens]

"""Bodies of the spawned ranks of test_expert_dispatch: each rank dispatches its own
random tokens to the experts' owners and returns what came back, with the bytes its
communicators counted. Every rank (and the test) rebuilds every rank's inputs from the
seed, so each can be checked against a computation that moves nothing."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from shardline import kernels
from shardline.distributed import parallel_state as ps
from shardline.layers.expert_parallel import dispatch_all_gather, dispatch_all_to_all, expert_range
from shardline.layers.moe import select_experts

HIDDEN, INTER, TOP_K = 16, 8, 2


def make_case(seed: int, tokens: list[int], experts: int
              ) -> tuple[torch.Tensor, torch.Tensor, list[tuple[torch.Tensor, ...]]]:
    """All experts' weights (w13, w2) and every rank's (x, weights, ids), from the seed."""
    gen = torch.Generator().manual_seed(seed)
    w13 = torch.randn(experts, 2 * INTER, HIDDEN, generator=gen) / HIDDEN ** 0.5
    w2 = torch.randn(experts, HIDDEN, INTER, generator=gen) / INTER ** 0.5
    per_rank = []
    for count in tokens:
        x = torch.randn(count, HIDDEN, generator=gen)
        weights, ids = select_experts(torch.randn(count, experts, generator=gen), TOP_K, False)
        per_rank.append((x, weights, ids))
    return w13, w2, per_rank


def expected_output(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
                    w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """sum_k weights[t, k] * expert_{ids[t, k]}(x[t]), one token and choice at a time."""
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for k in range(ids.shape[1]):
            gate, up = w13[ids[t, k]].chunk(2, dim=0)
            out[t] += weights[t, k] * (w2[ids[t, k]] @ (F.silu(gate @ x[t]) * (up @ x[t])))
    return out


def check_dispatch(rank: int, seed: int, tokens: list[int], experts: int) -> dict:
    """Dispatch this rank's tokens by each path in turn: {path: the output against
    expected_output, the rows this rank's experts ran on, the bytes counted per op}."""
    return {path: _dispatch(rank, seed, path, tokens, experts)
            for path in ("all_to_all", "all_gather")}


def _dispatch(rank: int, seed: int, path: str, tokens: list[int], experts: int) -> dict:
    ep = ps.get_ep_group()
    w13, w2, inputs = make_case(seed, tokens, experts)
    x, weights, ids = inputs[rank]
    mine = expert_range(experts, ep.size, ep.rank)
    computed = []

    def compute(rows: torch.Tensor, w: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
        computed.append(rows.shape[0])
        return kernels.fused_moe(rows, w13[mine.start:mine.stop], w2[mine.start:mine.stop],
                                 w, i, mine.start)

    ps.get_parallel_state().reset_comm_stats()
    if path == "all_to_all":
        out = dispatch_all_to_all(x, weights, ids, len(mine), ep, compute)
    else:
        out = dispatch_all_gather(x, weights, ids, ep, compute)
    expected = expected_output(x, weights, ids, w13, w2)
    (stats,) = ps.get_parallel_state().comm_stats().values()
    return {"shape": list(out.shape), "error": (out - expected).abs().max().item() if len(x)
            else 0.0, "scale": expected.abs().max().item() if len(x) else 0.0,
            "computed_rows": computed, "bytes": stats["bytes_sent"], "calls": stats["calls"]}

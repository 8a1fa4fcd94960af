"""Expert-parallel dispatch and combine over real process groups (gloo, CPU): each rank
holds its own random tokens, as DP or SP ranks do; every token comes back in its place
with its experts' weighted sum, and the bytes counted are those each path must move."""

from __future__ import annotations

import torch
from ep_workers import HIDDEN, TOP_K, make_case

from shardline.distributed.grid import RankGrid
from shardline.layers.expert_parallel import token_share

FP32 = 4


def _owner_rows(ids: torch.Tensor, per_rank: int, world: int) -> torch.Tensor:
    """[world] rows a rank's tokens send to each rank: one per token and owner."""
    hit = (ids // per_rank)[:, :, None] == torch.arange(world)
    return hit.any(dim=1).sum(dim=0)


def test_tokens_return_in_order_weighted_and_summed(run_world, fresh_seed):
    world, experts = 3, 6
    tokens = torch.randint(1, 9, (world,)).tolist()
    tokens[1] = 0       # a rank with nothing to do still takes part
    results = run_world(RankGrid(tp=world), "ep_workers:check_dispatch", fresh_seed, tokens,
                        experts, shm=False)
    _, _, inputs = make_case(fresh_seed, tokens, experts)
    sends = torch.stack([_owner_rows(ids, experts // world, world) for _, _, ids in inputs])
    for path in ("all_to_all", "all_gather"):
        for rank, result in enumerate(r[path] for r in results):
            assert result["shape"] == [tokens[rank], HIDDEN], (path, rank)
            assert result["error"] <= 1e-5 * max(result["scale"], 1.0), (path, rank, result)
            if path == "all_to_all":
                sent, received = sends[rank], sends[:, rank]
                assert result["computed_rows"] == [int(received.sum())]
                remote_out = int(sent.sum() - sent[rank])
                remote_back = int(received.sum() - received[rank])
                assert result["calls"] == {"all_to_all": 2}
                assert result["bytes"] == {"all_to_all": (remote_out * (HIDDEN + 2 * TOP_K)
                                                          + remote_back * HIDDEN) * FP32}
            else:
                rows = max(tokens)
                assert result["computed_rows"] == [world * rows]
                assert result["bytes"] == {
                    "all_gather": 8 + rows * (HIDDEN + 2 * TOP_K) * FP32,
                    "reduce_scatter": world * rows * HIDDEN * FP32}


def test_token_shares_cover_the_tokens_in_order():
    for tokens in range(0, 12):
        for parts in range(1, 6):
            shares = [token_share(tokens, parts, i) for i in range(parts)]
            assert [t for s in shares for t in range(tokens)[s]] == list(range(tokens))
            sizes = [s.stop - s.start for s in shares]
            assert max(sizes) == -(-tokens // parts)
            assert sizes == sorted(sizes, reverse=True)

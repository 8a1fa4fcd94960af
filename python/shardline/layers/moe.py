"""Mixture-of-experts: top-k softmax routing and the experts' stacked weights.

Experts are stored stacked (w13 [E, 2I, H]: gate rows then up rows; w2 [E, H, I]) so
one fused kernel runs them all. Checkpoints hold them either per expert (w1/w3/w2 or
gate_proj/up_proj/down_proj) or already fused (gate_up_proj, down_proj); the weight
loader accepts both. Tensor parallelism splits each expert's intermediate size; expert
parallelism (ParallelConfig.enable_expert_parallel) instead gives each rank of the EP
group whole experts, an equal contiguous share, and moves tokens to them (see
layers.expert_parallel).
"""

from __future__ import annotations

import torch
from torch import nn

from shardline import kernels
from shardline.distributed.parallel_state import get_ep_group, get_expert_dispatch, get_tp_group
from shardline.layers.expert_parallel import (dispatch_all_gather, dispatch_all_to_all,
                                              expert_range, gather_shares, token_share)
from shardline.layers.weights import Loaded, check_shape, copy_into, read_slice

EXPERT_SHARDS = ("gate", "up", "down", "gate_up", "down_all")


def select_experts(router_logits: torch.Tensor, top_k: int, renormalize: bool
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over experts in fp32, keep the top k; renormalize them to sum to 1 if asked."""
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


class FusedMoE(nn.Module):
    """A mixture-of-experts MLP: softmax router, top-k experts per token (renormalized
    when asked), this rank's experts' gate_up and down weights held as stacked tensors:
    a TP slice of every expert, or under expert parallelism its own experts
    (`local_experts`, global ids) whole."""

    def __init__(self, num_experts: int, top_k: int, hidden_size: int, intermediate_size: int,
                 renormalize: bool, dtype: torch.dtype = torch.float32):
        super().__init__()
        tp, ep = get_tp_group(), get_ep_group()
        self.dispatch = get_expert_dispatch()
        if self.dispatch is not None:
            self.local_experts = expert_range(num_experts, ep.size, ep.rank)
            self.tp_rank, self.tp_size = 0, 1
        else:
            if intermediate_size % tp.size:
                raise ValueError(f"moe intermediate_size={intermediate_size} is not divisible "
                                 f"by tensor_parallel_size={tp.size}")
            self.local_experts = range(num_experts)
            self.tp_rank, self.tp_size = tp.rank, tp.size
        self.num_experts, self.top_k, self.renormalize = num_experts, top_k, renormalize
        self.hidden_size, self.intermediate_size = hidden_size, intermediate_size
        part, local = intermediate_size // self.tp_size, len(self.local_experts)
        self.w13 = nn.Parameter(torch.empty(local, 2 * part, hidden_size, dtype=dtype),
                                requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(local, hidden_size, part, dtype=dtype),
                               requires_grad=False)

    def weight_loader(self, param: nn.Parameter, loaded: Loaded, name: str,
                      shard_id: object = None, expert_id: int | None = None) -> None:
        """Load one of this rank's experts' gate/up/down matrix, or all experts' fused
        gate_up/down (of which only this rank's experts are read)."""
        full, hidden = self.intermediate_size, self.hidden_size
        part = full // self.tp_size
        start = self.tp_rank * part
        first, local = self.local_experts.start, len(self.local_experts)
        if shard_id in ("gate", "up", "down"):
            if expert_id not in self.local_experts:
                raise ValueError(f"expert_id={expert_id!r} for {name!r} is invalid: this rank "
                                 f"holds experts [{first}, {self.local_experts.stop})")
            if shard_id == "down":
                check_shape(name, loaded, (hidden, full))
                copy_into(param[expert_id - first], read_slice(loaded, 1, start, part))
            else:
                check_shape(name, loaded, (full, hidden))
                offset = 0 if shard_id == "gate" else part
                copy_into(param[expert_id - first, offset:offset + part],
                          read_slice(loaded, 0, start, part))
        elif shard_id == "gate_up":
            check_shape(name, loaded, (self.num_experts, 2 * full, hidden))
            if self.dispatch is not None:
                copy_into(param, read_slice(loaded, 0, first, local))
            else:
                copy_into(param[:, :part], read_slice(loaded, 1, start, part))
                copy_into(param[:, part:], read_slice(loaded, 1, full + start, part))
        elif shard_id == "down_all":
            check_shape(name, loaded, (self.num_experts, hidden, full))
            if self.dispatch is not None:
                copy_into(param, read_slice(loaded, 0, first, local))
            else:
                copy_into(param, read_slice(loaded, 2, start, part))
        else:
            raise ValueError(f"shard_id={shard_id!r} for {name!r} is invalid: "
                             f"must be one of {EXPERT_SHARDS}")

    def forward(self, x: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        """x [T, H] (the same on every TP rank) -> sum over each token's top-k experts."""
        tp, ep = get_tp_group(), get_ep_group()
        if self.dispatch is None or (self.dispatch == "all_gather" and ep.size == tp.size):
            # Every rank holds every token: its experts' part of each, summed over ranks.
            weights, ids = select_experts(router_logits, self.top_k, self.renormalize)
            return tp.all_reduce(self.local_forward(x, weights, ids))
        share = token_share(x.shape[0], tp.size, tp.rank)
        weights, ids = select_experts(router_logits[share], self.top_k, self.renormalize)
        if self.dispatch == "all_to_all":
            out = dispatch_all_to_all(x[share], weights, ids, len(self.local_experts), ep,
                                      self.local_forward)
        else:
            out = dispatch_all_gather(x[share], weights, ids, ep, self.local_forward)
        return gather_shares(out, x.shape[0], tp)

    def local_forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor
                      ) -> torch.Tensor:
        """The weighted sum over this rank's experts (or expert slices) of each row's
        choices [N, k] of global expert ids."""
        return kernels.fused_moe(x, self.w13, self.w2, weights, ids, self.local_experts.start)

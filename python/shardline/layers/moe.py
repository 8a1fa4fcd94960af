"""Mixture-of-experts: top-k softmax routing and the experts' stacked weights.

Experts are stored stacked (w13 [E, 2I, H]: gate rows then up rows; w2 [E, H, I]) so
one fused kernel runs them all. Checkpoints hold them either per expert (w1/w3/w2 or
gate_proj/up_proj/down_proj) or already fused (gate_up_proj, down_proj); the weight
loader accepts both. Tensor parallelism splits each expert's intermediate size.
"""

from __future__ import annotations

import torch
from torch import nn

from shardline import kernels
from shardline.distributed.parallel_state import get_tp_group
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
    when asked), all experts' gate_up and down weights held as stacked tensors."""

    def __init__(self, num_experts: int, top_k: int, hidden_size: int, intermediate_size: int,
                 renormalize: bool, dtype: torch.dtype = torch.float32):
        super().__init__()
        tp = get_tp_group()
        if intermediate_size % tp.size:
            raise ValueError(f"moe intermediate_size={intermediate_size} is not divisible by "
                             f"tensor_parallel_size={tp.size}")
        self.tp_rank, self.tp_size = tp.rank, tp.size
        self.num_experts, self.top_k, self.renormalize = num_experts, top_k, renormalize
        self.hidden_size, self.intermediate_size = hidden_size, intermediate_size
        part = intermediate_size // tp.size
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * part, hidden_size, dtype=dtype),
                                requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_size, part, dtype=dtype),
                               requires_grad=False)

    def weight_loader(self, param: nn.Parameter, loaded: Loaded, name: str,
                      shard_id: object = None, expert_id: int | None = None) -> None:
        """Load one expert's gate/up/down matrix, or all experts' fused gate_up/down."""
        full, hidden = self.intermediate_size, self.hidden_size
        part = full // self.tp_size
        start = self.tp_rank * part
        if shard_id in ("gate", "up", "down"):
            if expert_id is None or not 0 <= expert_id < self.num_experts:
                raise ValueError(f"expert_id={expert_id!r} for {name!r} is invalid: "
                                 f"must be in [0, {self.num_experts})")
            if shard_id == "down":
                check_shape(name, loaded, (hidden, full))
                copy_into(param[expert_id], read_slice(loaded, 1, start, part))
            else:
                check_shape(name, loaded, (full, hidden))
                offset = 0 if shard_id == "gate" else part
                copy_into(param[expert_id, offset:offset + part],
                          read_slice(loaded, 0, start, part))
        elif shard_id == "gate_up":
            check_shape(name, loaded, (self.num_experts, 2 * full, hidden))
            copy_into(param[:, :part], read_slice(loaded, 1, start, part))
            copy_into(param[:, part:], read_slice(loaded, 1, full + start, part))
        elif shard_id == "down_all":
            check_shape(name, loaded, (self.num_experts, hidden, full))
            copy_into(param, read_slice(loaded, 2, start, part))
        else:
            raise ValueError(f"shard_id={shard_id!r} for {name!r} is invalid: "
                             f"must be one of {EXPERT_SHARDS}")

    def forward(self, x: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        weights, ids = select_experts(router_logits, self.top_k, self.renormalize)
        out = kernels.fused_moe(x, self.w13, self.w2, weights, ids)
        return get_tp_group().all_reduce(out)

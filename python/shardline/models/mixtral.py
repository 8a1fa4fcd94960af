"""Mixture-of-experts members of the Llama family: Mixtral and Qwen2-MoE.

Both replace the MLP with top-k routed experts. Mixtral renormalizes the chosen experts'
weights; Qwen2-MoE does so only with `norm_topk_prob`, and adds a shared expert scaled by
a sigmoid gate. Qwen2-MoE keeps a dense MLP in `mlp_only_layers` and off the
`decoder_sparse_step` grid.

Under expert parallelism each rank loads only the experts it owns (see layers.moe);
attention, the router and Qwen2-MoE's shared expert and dense layers stay as under TP.
"""

from __future__ import annotations

import torch
from torch import nn

from shardline.layers.linear import ReplicatedLinear
from shardline.layers.moe import FusedMoE
from shardline.layers.norm import RMSNorm
from shardline.models.llama import CausalLM, DecoderLayer, LlamaMLP, rotary_embedding


class SparseMoeBlock(nn.Module):
    """Router + stacked experts, optionally with a sigmoid-gated shared expert.

    The shared expert sees every token, so expert parallelism does not move tokens for
    it: it stays TP-split (a LlamaMLP: column-parallel gate/up, row-parallel down with
    its all-reduce) whether or not the routed experts are expert-parallel. The router is
    replicated on every rank.
    """

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, intermediate_size: int,
                 renormalize: bool, shared_intermediate_size: int, dtype: torch.dtype):
        super().__init__()
        self.gate = ReplicatedLinear(hidden_size, num_experts, dtype=dtype)
        self.experts = FusedMoE(num_experts, top_k, hidden_size, intermediate_size,
                                renormalize, dtype)
        self.shared_expert = None
        if shared_intermediate_size:
            self.shared_expert = LlamaMLP(hidden_size, shared_intermediate_size, dtype)
            self.shared_expert_gate = ReplicatedLinear(hidden_size, 1, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.experts(x, self.gate(x))
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out

    def forward_and_norm(self, x: torch.Tensor, residual: torch.Tensor, norm: RMSNorm
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(moe(x) + residual), moe(x) + residual), the DecoderLayer's MLP interface."""
        return norm(self(x), residual)


class MoECausalLM(CausalLM):
    """Shared expert-weight naming: per-expert tensors or fused gate_up_proj/down_proj."""

    expert_names = ("gate_proj", "up_proj", "down_proj")

    def expert_sources(self, name: str) -> list[list[tuple[str, object, int | None]]]:
        """The experts this rank holds, per expert or in the fused tensors."""
        if not name.endswith((".experts.w13", ".experts.w2")):
            return []
        base, _, leaf = name.rpartition(".")
        experts = self.get_submodule(base).local_experts
        gate, up, down = self.expert_names
        if leaf == "w13":
            per_expert = [(f"{base}.{e}.{proj}.weight", shard, e)
                          for e in experts for proj, shard in ((gate, "gate"), (up, "up"))]
            return [per_expert, [(f"{base}.gate_up_proj", "gate_up", None)]]
        per_expert = [(f"{base}.{e}.{down}.weight", "down", e) for e in experts]
        return [per_expert, [(f"{base}.down_proj", "down_all", None)]]


class MixtralForCausalLM(MoECausalLM):
    expert_names = ("w1", "w3", "w2")

    def __init__(self, config: dict, dtype: torch.dtype, max_position: int,
                 layers: range | None = None):
        rotary = rotary_embedding(config, max_position)

        def make_layer(i: int) -> DecoderLayer:
            moe = SparseMoeBlock(config["hidden_size"], config["num_local_experts"],
                                 config["num_experts_per_tok"], config["intermediate_size"],
                                 True, 0, dtype)
            return DecoderLayer(config, dtype, rotary, moe, "block_sparse_moe", False, False)

        super().__init__(config, dtype, max_position, make_layer, layers)


class Qwen2MoeForCausalLM(MoECausalLM):
    def __init__(self, config: dict, dtype: torch.dtype, max_position: int,
                 layers: range | None = None):
        sparse_step = config.get("decoder_sparse_step") or 1
        dense_layers = set(config.get("mlp_only_layers") or [])
        qkv_bias = config.get("qkv_bias", True)
        rotary = rotary_embedding(config, max_position)

        def make_layer(i: int) -> DecoderLayer:
            if (i not in dense_layers and config["num_experts"] > 0
                    and (i + 1) % sparse_step == 0):
                mlp = SparseMoeBlock(config["hidden_size"], config["num_experts"],
                                     config["num_experts_per_tok"],
                                     config["moe_intermediate_size"],
                                     config.get("norm_topk_prob", False),
                                     config.get("shared_expert_intermediate_size", 0), dtype)
            else:
                mlp = LlamaMLP(config["hidden_size"], config["intermediate_size"], dtype)
            return DecoderLayer(config, dtype, rotary, mlp, "mlp", qkv_bias, False)

        super().__init__(config, dtype, max_position, make_layer, layers)

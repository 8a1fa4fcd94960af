"""Paged attention: write this step's K/V into the cache, then attend over the cache.

All scheduled tokens of a step form one flat batch; `AttentionMetadata` says which tokens
belong to which sequence and where their K/V live. The math is `shardline.kernels`':
Triton on CUDA; on the CPU, a C++ kernel for decode and the torch reference for prefill.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from shardline import kernels
from shardline.layers import cpu_ops
from shardline.layers.linear import QKVParallelLinear
from shardline.layers.rotary import RotaryEmbedding


@dataclass
class AttentionMetadata:
    """Where one step's tokens sit: per token a cache slot, per sequence its query span in
    the flat batch, its total length after this step and its block table (padded rows)."""

    slot_mapping: torch.Tensor      # [T] int64
    query_start_loc: torch.Tensor   # [B + 1] int32, cumulative query lengths
    seq_lens: torch.Tensor          # [B] int32
    block_tables: torch.Tensor      # [B, max_blocks] int32
    decode_only: bool               # every sequence has exactly one query token


class Attention(nn.Module):
    """Attention of one layer over its paged KV cache ([num_blocks, block_size, Hk, D])."""

    def __init__(self, num_heads: int, head_dim: int, num_kv_heads: int, scale: float):
        super().__init__()
        self.num_heads, self.head_dim, self.num_kv_heads = num_heads, head_dim, num_kv_heads
        self.scale = scale
        self.k_cache = torch.empty(0)
        self.v_cache = torch.empty(0)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        """q [T, Hq, D], k and v [T, Hk, D] of this step's tokens, q and k rotated ->
        [T, Hq * D]."""
        kernels.write_kv_cache(k, v, self.k_cache, self.v_cache, meta.slot_mapping)
        return self.attend(q, meta)

    def forward_projected(self, x: torch.Tensor, qkv_proj: QKVParallelLinear,
                          rotary: RotaryEmbedding, positions: torch.Tensor,
                          meta: AttentionMetadata) -> torch.Tensor:
        """Hidden states x [T, H] -> [T, Hq * D]: projected by `qkv_proj`, q and k rotated
        by `positions`, K and V stored in the cache, in as few kernels as the path allows
        (the rotary kernel stores K and V, and on the split-K path also reduces the
        projection); attention reads K and V only from the cache. In fp32 on the CPU the
        projection (through its packed weight where it has one, layers.cpu_gemm) is followed
        by one C++ pass for the rotary and the store (layers.cpu_ops)."""
        if cpu_ops.applies(x) and rotary.is_neox and self.k_cache.dtype == torch.float32:
            q = cpu_ops.rotary_and_write_kv_cache(
                qkv_proj.matmul(x, qkv_proj.bias), qkv_proj.num_heads, positions,
                rotary.cos_sin_cache, self.k_cache, self.v_cache, meta.slot_mapping)
            return self.attend(q, meta)
        q = kernels.qkv_rotary_and_write_kv_cache(
            x, qkv_proj.weight, qkv_proj.bias, positions, rotary.cos_sin_cache, rotary.is_neox,
            self.k_cache, self.v_cache, meta.slot_mapping, self.num_heads)
        return self.attend(q, meta)

    def attend(self, q: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """q [T, Hq, D] over the cache, K and V of this step already in it -> [T, Hq * D]."""
        if meta.decode_only:
            out = kernels.paged_decode_attention(q, self.k_cache, self.v_cache,
                                                 meta.block_tables, meta.seq_lens, self.scale)
        else:
            out = kernels.paged_prefill_attention(q, self.k_cache, self.v_cache,
                                                  meta.block_tables, meta.query_start_loc,
                                                  meta.seq_lens, self.scale)
        return out.reshape(q.shape[0], -1)

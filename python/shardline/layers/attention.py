"""Paged attention: write this step's K/V into the cache, then attend over the cache.

All scheduled tokens of a step form one flat batch; `AttentionMetadata` says which tokens
belong to which sequence and where their K/V live. On CUDA (or when Triton is forced) the
kernels of `shardline.kernels` run; on CPU a batched torch path replaces the reference's
per-sequence loop, with the same semantics: the query at position p sees keys 0..p.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from shardline import kernels
from shardline.kernels.dispatch import use_triton


@dataclass
class AttentionMetadata:
    """Where one step's tokens sit: per token a cache slot, per sequence its query span in
    the flat batch, its total length after this step and its block table (padded rows)."""

    slot_mapping: torch.Tensor      # [T] int64
    query_start_loc: torch.Tensor   # [B + 1] int32, cumulative query lengths
    seq_lens: torch.Tensor          # [B] int32
    block_tables: torch.Tensor      # [B, max_blocks] int32
    decode_only: bool               # every sequence has exactly one query token


def torch_paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                          block_tables: torch.Tensor, query_start_loc: torch.Tensor,
                          seq_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal varlen attention over cached K/V, all sequences in one padded SDPA call.

    Same contract as `kernels.paged_prefill_attention`; decode is the case of one query
    per sequence.
    """
    q_lens = (query_start_loc[1:] - query_start_loc[:-1]).long()
    seq_lens = seq_lens.long()
    block_size = k_cache.shape[1]
    max_len = int(seq_lens.max())
    table = block_tables[:, :-(-max_len // block_size)].long()
    k = k_cache[table].flatten(1, 2)[:, :max_len].transpose(1, 2)   # [B, Hk, L, D]
    v = v_cache[table].flatten(1, 2)[:, :max_len].transpose(1, 2)
    key_pos = torch.arange(max_len, device=q.device)
    gqa = q.shape[1] != k.shape[1]
    if q.shape[0] == seq_lens.shape[0] and bool((q_lens == 1).all()):
        mask = (key_pos[None, :] < seq_lens[:, None])[:, None, None]  # [B, 1, 1, L]
        out = F.scaled_dot_product_attention(q[:, :, None], k, v, attn_mask=mask, scale=scale,
                                             enable_gqa=gqa)
        return out[:, :, 0]
    j = torch.arange(int(q_lens.max()), device=q.device)
    valid = j[None, :] < q_lens[:, None]                              # [B, Qmax]
    rows = (query_start_loc[:-1].long()[:, None] + j[None, :]).clamp(max=q.shape[0] - 1)
    q_pos = seq_lens[:, None] - q_lens[:, None] + j[None, :]
    mask = key_pos[None, None, :] <= q_pos[:, :, None]                # [B, Qmax, L]
    mask |= ~valid[:, :, None]   # padding rows attend to something, then are dropped
    out = F.scaled_dot_product_attention(q[rows].transpose(1, 2), k, v, attn_mask=mask[:, None],
                                         scale=scale, enable_gqa=gqa)
    return out.transpose(1, 2)[valid]


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
        """q [T, Hq, D], k and v [T, Hk, D] of this step's tokens -> [T, Hq * D]."""
        kernels.write_kv_cache(k, v, self.k_cache, self.v_cache, meta.slot_mapping)
        if not use_triton(q):
            out = torch_paged_attention(q, self.k_cache, self.v_cache, meta.block_tables,
                                        meta.query_start_loc, meta.seq_lens, self.scale)
        elif meta.decode_only:
            out = kernels.paged_decode_attention(q, self.k_cache, self.v_cache,
                                                 meta.block_tables, meta.seq_lens, self.scale)
        else:
            out = kernels.paged_prefill_attention(q, self.k_cache, self.v_cache,
                                                  meta.block_tables, meta.query_start_loc,
                                                  meta.seq_lens, self.scale)
        return out.reshape(q.shape[0], -1)

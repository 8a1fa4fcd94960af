"""Shape checks the attention kernels share, so bad input fails before a launch."""

from __future__ import annotations

import torch


def check_paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                          block_tables: torch.Tensor, seq_lens: torch.Tensor) -> None:
    """q [tokens, Hq, D] against a [blocks, block_size, Hk, D] cache and B sequences."""
    if q.dim() != 3:
        raise ValueError(f"q must be [tokens, Hq, D]; got shape {tuple(q.shape)}")
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache and v_cache must be the same [blocks, block_size, Hk, D]; "
                         f"got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    if k_cache.shape[3] != q.shape[2]:
        raise ValueError(f"head size of q ({q.shape[2]}) and of the cache "
                         f"({k_cache.shape[3]}) differ")
    if q.shape[1] % k_cache.shape[2] != 0:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of KV heads "
                         f"({k_cache.shape[2]})")
    if block_tables.dim() != 2:
        raise ValueError(f"block_tables must be [B, max_blocks]; got {tuple(block_tables.shape)}")
    if seq_lens.shape != (block_tables.shape[0],):
        raise ValueError(f"seq_lens must be [{block_tables.shape[0]}]; got "
                         f"{tuple(seq_lens.shape)}")
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("k_cache and v_cache must have a contiguous last dim")


def check_qkv_weight(weight: torch.Tensor, num_heads: int, k_cache: torch.Tensor
                     ) -> tuple[int, int]:
    """(KV heads, head size) of a fused QKV weight [(Hq + 2 Hk) D, H] that feeds the cache
    k_cache [blocks, block_size, Hk, D]."""
    if k_cache.dim() != 4:
        raise ValueError(f"k_cache must be [blocks, block_size, Hk, D]; got "
                         f"{tuple(k_cache.shape)}")
    num_kv_heads, head_size = k_cache.shape[2], k_cache.shape[3]
    rows = (num_heads + 2 * num_kv_heads) * head_size
    if weight.dim() != 2 or weight.shape[0] != rows:
        raise ValueError(f"weight must be [(num_heads {num_heads} + 2 x {num_kv_heads} KV heads "
                         f"of the cache) x head size {head_size} = {rows}, hidden]; got "
                         f"{tuple(weight.shape)}")
    return num_kv_heads, head_size

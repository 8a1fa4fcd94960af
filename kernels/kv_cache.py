"""Triton kernel that stores the new tokens' K and V into their paged-cache slots.

One program copies one token's K and V rows (a tile of its KV heads); a slot of -1 marks
a padding token and is skipped, so padded batches need no compaction first.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from shardline.kernels._checks import check_index, unit_last_dim
from shardline.kernels._config import autotune, jit_for_serving


@autotune(
    configs=[triton.Config({}, num_warps=w) for w in (1, 2, 4)],
    key=["BLOCK_H", "BLOCK_D"],
    fixed=triton.Config({}, num_warps=4),
)
@jit_for_serving(pointers=("slot_ptr",))
def _write_kv_cache_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    num_kv_heads, head_dim,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_kc_block, stride_kc_slot, stride_kc_head,
    stride_vc_block, stride_vc_slot, stride_vc_head,
    BLOCK_SIZE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    block = slot // BLOCK_SIZE
    offset = slot % BLOCK_SIZE

    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    dims = tl.arange(0, BLOCK_D)
    heads_to_write = tl.where(slot >= 0, num_kv_heads, 0)
    mask = (heads[:, None] < heads_to_write) & (dims[None, :] < head_dim)

    k = tl.load(k_ptr + token * stride_kt + heads[:, None] * stride_kh + dims[None, :],
                mask=mask)
    v = tl.load(v_ptr + token * stride_vt + heads[:, None] * stride_vh + dims[None, :],
                mask=mask)
    k_dst = (k_cache_ptr + block * stride_kc_block + offset * stride_kc_slot
             + heads[:, None] * stride_kc_head + dims[None, :])
    v_dst = (v_cache_ptr + block * stride_vc_block + offset * stride_vc_slot
             + heads[:, None] * stride_vc_head + dims[None, :])
    tl.store(k_dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def check_kv_cache_write(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                         v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> torch.Tensor:
    """Refuse K/V, caches and slots whose shapes do not go together; returns slot_mapping
    contiguous."""
    if k.shape != v.shape or k.dim() != 3:
        raise ValueError(f"k and v must both be [T, Hk, D]; got k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}")
    if k_cache.shape != v_cache.shape or k_cache.shape[2:] != k.shape[1:]:
        raise ValueError(f"k_cache and v_cache must be [blocks, block_size, {k.shape[1]}, "
                         f"{k.shape[2]}]; got {tuple(k_cache.shape)}, {tuple(v_cache.shape)}")
    slot_mapping = check_index(slot_mapping, "slot_mapping", k.shape[0], "one slot per token")
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("k_cache and v_cache must have a contiguous last dim")
    return slot_mapping


def write_kv_cache(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                   v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Store k, v [T, Hk, D] at their slots of k_cache, v_cache [blocks, block_size, Hk, D].

    A slot of -1 (padding) is skipped. k and v may be strided views (e.g. slices of a
    fused qkv projection); only their last dim must be contiguous.
    """
    slot_mapping = check_kv_cache_write(k, v, k_cache, v_cache, slot_mapping)
    num_tokens, num_kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    k, v = unit_last_dim(k), unit_last_dim(v)
    block_d = triton.next_power_of_2(head_dim)
    block_h = max(1, min(triton.next_power_of_2(num_kv_heads), 4096 // block_d))
    grid = (num_tokens, triton.cdiv(num_kv_heads, block_h))
    _write_kv_cache_kernel[grid](
        k, v, k_cache, v_cache, slot_mapping,
        num_kv_heads, head_dim,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        BLOCK_SIZE=k_cache.shape[1], BLOCK_H=block_h, BLOCK_D=block_d,
    )

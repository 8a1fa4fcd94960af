"""Rotary embedding fused with the KV-cache write: one kernel where there were two.

Attention needs the rotated K only in the cache, so the rotation stores it straight into
the token's slot, and V goes there in the same program. Per layer this saves a launch
and a write and re-read of K; in a decode step, where each kernel moves a few kilobytes,
the launch is most of the cost.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from shardline.kernels.kv_cache import check_kv_cache_write, unit_last_dim
from shardline.kernels.rotary import check_rotary_inputs, load_cos_sin, rotary_meta, rotate_heads


@triton.jit
def _rotary_kv_cache_kernel(
    pos_ptr, slot_ptr, q_ptr, k_ptr, v_ptr, cos_sin_ptr, q_out_ptr, k_cache_ptr, v_cache_ptr,
    HQ, HK, HALF, D,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_cos_sin,
    stride_qot, stride_qoh,
    stride_kc_block, stride_kc_slot, stride_kc_head,
    stride_vc_block, stride_vc_slot, stride_vc_head,
    KV_BLOCK_SIZE: tl.constexpr, IS_NEOX: tl.constexpr, BLOCK_HQ: tl.constexpr,
    BLOCK_HK: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_TAIL: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    cos, sin = load_cos_sin(pos_ptr, cos_sin_ptr, token, stride_cos_sin, HALF, BLOCK_HALF)
    rotate_heads(q_ptr + token * stride_qt, q_out_ptr + token * stride_qot, HQ, stride_qh,
                 stride_qoh, cos, sin, HALF, D, IS_NEOX, BLOCK_HQ, BLOCK_HALF, BLOCK_TAIL)

    # A padding token (slot -1) still has its query rotated, but writes no K or V.
    slot = tl.load(slot_ptr + token).to(tl.int64)
    kv_heads = tl.where(slot >= 0, HK, 0)
    block = slot // KV_BLOCK_SIZE
    offset = slot % KV_BLOCK_SIZE
    rotate_heads(k_ptr + token * stride_kt,
                 k_cache_ptr + block * stride_kc_block + offset * stride_kc_slot, kv_heads,
                 stride_kh, stride_kc_head, cos, sin, HALF, D, IS_NEOX, BLOCK_HK, BLOCK_HALF,
                 BLOCK_TAIL)

    heads = tl.arange(0, BLOCK_HK)
    dims = tl.arange(0, BLOCK_D)
    mask = (heads[:, None] < kv_heads) & (dims[None, :] < D)
    v = tl.load(v_ptr + token * stride_vt + heads[:, None] * stride_vh + dims[None, :],
                mask=mask)
    v_dst = (v_cache_ptr + block * stride_vc_block + offset * stride_vc_slot
             + heads[:, None] * stride_vc_head + dims[None, :])
    tl.store(v_dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def rotary_and_write_kv_cache(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                              v: torch.Tensor, cos_sin_cache: torch.Tensor, is_neox: bool,
                              k_cache: torch.Tensor, v_cache: torch.Tensor,
                              slot_mapping: torch.Tensor) -> torch.Tensor:
    """Rotate q[T, Hq, D] and k[T, Hk, D] by position, store the rotated k and v[T, Hk, D]
    at their cache slots (-1: skipped) and return the rotated q, as
    reference.rotary_and_write_kv_cache. q, k and v may be views of a fused projection."""
    check_kv_cache_write(k, v, k_cache, v_cache, slot_mapping)
    q, k, cos_sin_cache = check_rotary_inputs(positions, q, k, cos_sin_cache)
    v = unit_last_dim(v)
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    tokens = positions.shape[0]
    if tokens:
        _rotary_kv_cache_kernel[(tokens,)](
            positions, slot_mapping.contiguous(), q, k, v, cos_sin_cache, q_out, k_cache,
            v_cache, q.shape[1], k.shape[1], cos_sin_cache.shape[-1] // 2, q.shape[-1],
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            cos_sin_cache.stride(0), q_out.stride(0), q_out.stride(1),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
            KV_BLOCK_SIZE=k_cache.shape[1], BLOCK_D=triton.next_power_of_2(q.shape[-1]),
            **rotary_meta(q, k, cos_sin_cache, is_neox))
    return q_out

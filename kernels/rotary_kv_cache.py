"""Rotary embedding fused with the KV-cache write: one kernel where there were two, and on
the split-K path of the QKV projection, with that projection's reduction too.

Attention needs the rotated K only in the cache, so the rotation stores it straight into
the token's slot, and V goes there in the same program. Per layer this saves a launch
and a write and re-read of K; in a decode step, where each kernel moves a few kilobytes,
the launch is most of the cost. A decode-shaped QKV projection splits K into fp32
partials (shardline.kernels.matmul_split_k); this kernel can read those partials, sum
them and add the bias as it loads each head, in place of the reduction pass.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from shardline.kernels import matmul, matmul_split_k
from shardline.kernels._checks import check_index, check_qkv_weight, unit_last_dim
from shardline.kernels._config import jit_for_serving
from shardline.kernels.kv_cache import check_kv_cache_write
from shardline.kernels.reference import split_qkv
from shardline.kernels.rotary import (check_rotary_inputs, load_cos_sin, load_heads,
                                      rotary_meta, rotate_heads)


@jit_for_serving(pointers=("pos_ptr", "slot_ptr"))
def _rotary_kv_cache_kernel(
    pos_ptr, slot_ptr, q_ptr, k_ptr, v_ptr, bias_ptr, cos_sin_ptr, q_out_ptr, k_cache_ptr,
    v_cache_ptr, HQ, HK, HALF, D,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_split,
    stride_cos_sin, stride_qot, stride_qoh,
    stride_kc_block, stride_kc_slot, stride_kc_head,
    stride_vc_block, stride_vc_slot, stride_vc_head,
    KV_BLOCK_SIZE: tl.constexpr, SPLITS: tl.constexpr, HAS_BIAS: tl.constexpr,
    IS_NEOX: tl.constexpr,
    BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_HALF: tl.constexpr,
    BLOCK_TAIL: tl.constexpr, BLOCK_D: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    cos, sin = load_cos_sin(pos_ptr, cos_sin_ptr, token, stride_cos_sin, HALF, BLOCK_HALF)
    rotate_heads(q_ptr + token * stride_qt, q_out_ptr + token * stride_qot, HQ, stride_qh,
                 stride_qoh, cos, sin, HALF, D, bias_ptr, stride_split, SPLITS, HAS_BIAS,
                 IS_NEOX, BLOCK_HQ, BLOCK_HALF, BLOCK_TAIL)

    # A padding token (slot -1) still has its query rotated, but writes no K or V.
    slot = tl.load(slot_ptr + token).to(tl.int64)
    kv_heads = tl.where(slot >= 0, HK, 0)
    block = slot // KV_BLOCK_SIZE
    offset = slot % KV_BLOCK_SIZE
    rotate_heads(k_ptr + token * stride_kt,
                 k_cache_ptr + block * stride_kc_block + offset * stride_kc_slot, kv_heads,
                 stride_kh, stride_kc_head, cos, sin, HALF, D, bias_ptr + HQ * D, stride_split,
                 SPLITS, HAS_BIAS, IS_NEOX, BLOCK_HK, BLOCK_HALF, BLOCK_TAIL)

    heads = tl.arange(0, BLOCK_HK)
    dims = tl.arange(0, BLOCK_D)
    mask = (heads[:, None] < kv_heads) & (dims[None, :] < D)
    v = load_heads(v_ptr + token * stride_vt, bias_ptr + (HQ + HK) * D, heads, dims, mask,
                   stride_vh, D, stride_split, SPLITS, HAS_BIAS)
    v_dst = (v_cache_ptr + block * stride_vc_block + offset * stride_vc_slot
             + heads[:, None] * stride_vc_head + dims[None, :])
    tl.store(v_dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def _rotate_store(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  cos_sin_cache: torch.Tensor, is_neox: bool, k_cache: torch.Tensor,
                  v_cache: torch.Tensor, slot_mapping: torch.Tensor, out_dtype: torch.dtype,
                  bias: torch.Tensor | None = None, splits: int = 1,
                  stride_split: int = 0) -> torch.Tensor:
    """Check the inputs, then rotate q and k (each head the sum of `splits` partials
    `stride_split` apart, plus `bias`), store k and v at their slots; returns q rotated."""
    slot_mapping = check_kv_cache_write(k, v, k_cache, v_cache, slot_mapping)
    positions, q, k, cos_sin_cache = check_rotary_inputs(positions, q, k, cos_sin_cache)
    v = unit_last_dim(v)
    q_out = torch.empty(q.shape, dtype=out_dtype, device=q.device)
    tokens = positions.shape[0]
    if not tokens:
        return q_out
    _rotary_kv_cache_kernel[(tokens,)](
        positions, slot_mapping, q, k, v, q if bias is None else bias,
        cos_sin_cache, q_out, k_cache, v_cache, q.shape[1], k.shape[1],
        cos_sin_cache.shape[-1] // 2, q.shape[-1],
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        stride_split, cos_sin_cache.stride(0), q_out.stride(0), q_out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        KV_BLOCK_SIZE=k_cache.shape[1], SPLITS=splits, HAS_BIAS=bias is not None,
        BLOCK_D=triton.next_power_of_2(q.shape[-1]),
        **rotary_meta(q, k, cos_sin_cache, is_neox))
    return q_out


def rotary_and_write_kv_cache(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                              v: torch.Tensor, cos_sin_cache: torch.Tensor, is_neox: bool,
                              k_cache: torch.Tensor, v_cache: torch.Tensor,
                              slot_mapping: torch.Tensor) -> torch.Tensor:
    """Rotate q[T, Hq, D] and k[T, Hk, D] by position, store the rotated k and v[T, Hk, D]
    at their cache slots (-1: skipped) and return the rotated q, as
    reference.rotary_and_write_kv_cache. q, k and v may be views of a fused projection."""
    return _rotate_store(positions, q, k, v, cos_sin_cache, is_neox, k_cache, v_cache,
                         slot_mapping, q.dtype)


def qkv_rotary_and_write_kv_cache(x: torch.Tensor, weight: torch.Tensor,
                                  bias: torch.Tensor | None, positions: torch.Tensor,
                                  cos_sin_cache: torch.Tensor, is_neox: bool,
                                  k_cache: torch.Tensor, v_cache: torch.Tensor,
                                  slot_mapping: torch.Tensor, num_heads: int) -> torch.Tensor:
    """x [T, H] projected by the fused QKV weight [(Hq + 2 Hk) D, H] (+ bias), then as
    rotary_and_write_kv_cache: returns the rotated q [T, Hq, D], as the reference.

    Hk and D are the cache's. Where the projection splits K, its partials and this kernel
    are the only launches: the kernel sums the partials as it loads each head, in place of
    the reduction pass.
    """
    bias = matmul.check_linear(x, weight, bias)
    heads = (num_heads, *check_qkv_weight(weight, num_heads, k_cache))
    # Per-token inputs are checked before the projection runs, so that their errors name
    # them rather than the projection's q, k and v.
    tokens = x.shape[0]
    check_index(positions, "positions", tokens, "one position per row of x")
    check_index(slot_mapping, "slot_mapping", tokens, "one slot per row of x")
    split, k_split = matmul_split_k.k_slices(x, weight, None)
    if split == 1 or tokens == 0:
        q, k, v = split_qkv(matmul.linear(x, weight, bias), *heads)
        return _rotate_store(positions, q, k, v, cos_sin_cache, is_neox, k_cache, v_cache,
                             slot_mapping, x.dtype)
    ws = matmul_split_k.partials(x, weight, split, k_split)
    q, k, v = split_qkv(ws[0], *heads)
    return _rotate_store(positions, q, k, v, cos_sin_cache, is_neox, k_cache, v_cache,
                         slot_mapping, x.dtype, bias, split, ws.stride(0))

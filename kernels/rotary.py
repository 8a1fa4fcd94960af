"""Triton rotary position embedding of q and k, neox or GPT-J pairing, partial rotary.

One program per token rotates every query and key head of that token, reading the
token's cos/sin row once. How the cache was built (plain, Llama 3 scaled, ...) does not
matter here: it is any [positions, rot_dim] table of [cos | sin].
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from shardline.kernels._checks import check_index, output_like, unit_last_dim
from shardline.kernels._config import jit_for_serving


@triton.jit
def load_heads(src, bias, heads, dims, mask, stride_sh, D, stride_split,
               SPLITS: tl.constexpr, HAS_BIAS: tl.constexpr):
    """fp32 [heads, dims] of one token's row at `src`: the sum of SPLITS slices
    `stride_split` apart (split-K partials; one slice is a plain load), plus the heads'
    bias from `bias` (contiguous heads of D) with HAS_BIAS."""
    ptrs = src + heads[:, None] * stride_sh + dims[None, :]
    x = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    # Unrolled, so the slices' loads are all in flight at once rather than one by one.
    for split in tl.static_range(1, SPLITS):
        x += tl.load(ptrs + split * stride_split, mask=mask, other=0.0)
    if HAS_BIAS:
        x += tl.load(bias + heads[:, None] * D + dims[None, :], mask=mask,
                     other=0.0).to(tl.float32)
    return x


@triton.jit
def rotate_heads(src, dst, H, stride_sh, stride_dh, cos, sin, HALF, D, bias, stride_split,
                 SPLITS: tl.constexpr, HAS_BIAS: tl.constexpr, IS_NEOX: tl.constexpr,
                 BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_TAIL: tl.constexpr):
    """Rotate the first H heads of one token's row at `src` (read as load_heads does) into
    `dst` (cast to its type)."""
    offs_h = tl.arange(0, BLOCK_H)
    offs_i = tl.arange(0, BLOCK_HALF)
    if IS_NEOX:
        dim_a = offs_i
        dim_b = offs_i + HALF
    else:
        dim_a = 2 * offs_i
        dim_b = 2 * offs_i + 1
    mask = (offs_h[:, None] < H) & (offs_i[None, :] < HALF)
    dst_heads = dst + offs_h[:, None] * stride_dh
    a = load_heads(src, bias, offs_h, dim_a, mask, stride_sh, D, stride_split, SPLITS, HAS_BIAS)
    b = load_heads(src, bias, offs_h, dim_b, mask, stride_sh, D, stride_split, SPLITS, HAS_BIAS)
    out_ty = dst.dtype.element_ty
    tl.store(dst_heads + dim_a[None, :], (a * cos - b * sin).to(out_ty), mask=mask)
    tl.store(dst_heads + dim_b[None, :], (b * cos + a * sin).to(out_ty), mask=mask)
    if BLOCK_TAIL > 0:
        offs_t = 2 * HALF + tl.arange(0, BLOCK_TAIL)
        tail_mask = (offs_h[:, None] < H) & (offs_t[None, :] < D)
        tail = load_heads(src, bias, offs_h, offs_t, tail_mask, stride_sh, D, stride_split,
                          SPLITS, HAS_BIAS)
        tl.store(dst_heads + offs_t[None, :], tail.to(out_ty), mask=tail_mask)


@triton.jit
def load_cos_sin(pos_ptr, cache_ptr, token, stride_cache, HALF, BLOCK_HALF: tl.constexpr):
    """The [1, BLOCK_HALF] cos and sin rows of `token`'s position, in fp32."""
    pos = tl.load(pos_ptr + token).to(tl.int64)
    offs_i = tl.arange(0, BLOCK_HALF)
    row = cache_ptr + pos * stride_cache
    cos = tl.load(row + offs_i, mask=offs_i < HALF, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(row + HALF + offs_i, mask=offs_i < HALF, other=0.0).to(tl.float32)[None, :]
    return cos, sin


@jit_for_serving(pointers=("pos_ptr",))
def _rotary_kernel(pos_ptr, q_ptr, k_ptr, cache_ptr, q_out_ptr, k_out_ptr, HQ, HK, HALF, D,
                   stride_qt, stride_qh, stride_kt, stride_kh, stride_cache,
                   stride_qot, stride_qoh, stride_kot, stride_koh,
                   IS_NEOX: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr,
                   BLOCK_HALF: tl.constexpr, BLOCK_TAIL: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    cos, sin = load_cos_sin(pos_ptr, cache_ptr, token, stride_cache, HALF, BLOCK_HALF)
    rotate_heads(q_ptr + token * stride_qt, q_out_ptr + token * stride_qot, HQ, stride_qh,
                 stride_qoh, cos, sin, HALF, D, bias=q_ptr, stride_split=0, SPLITS=1,
                 HAS_BIAS=False, IS_NEOX=IS_NEOX, BLOCK_H=BLOCK_HQ, BLOCK_HALF=BLOCK_HALF,
                 BLOCK_TAIL=BLOCK_TAIL)
    rotate_heads(k_ptr + token * stride_kt, k_out_ptr + token * stride_kot, HK, stride_kh,
                 stride_koh, cos, sin, HALF, D, bias=k_ptr, stride_split=0, SPLITS=1,
                 HAS_BIAS=False, IS_NEOX=IS_NEOX, BLOCK_H=BLOCK_HK, BLOCK_HALF=BLOCK_HALF,
                 BLOCK_TAIL=BLOCK_TAIL)


def _heads(t: torch.Tensor, name: str, tokens: int, d: int) -> torch.Tensor:
    if t.dim() != 3 or t.shape[0] != tokens or t.shape[2] != d:
        raise ValueError(f"{name} must be [{tokens}, heads, {d}] (tokens of positions, head "
                         f"size of q); got {tuple(t.shape)}")
    return unit_last_dim(t)


def check_rotary_inputs(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                        cos_sin_cache: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Refuse bad shapes; return positions contiguous, and q, k and the table with a unit
    last stride."""
    if positions.dim() != 1:
        raise ValueError(f"positions must be [T]; got {tuple(positions.shape)}")
    tokens, d = positions.shape[0], q.shape[-1]
    positions = check_index(positions, "positions", tokens, "one position per token")
    q, k = _heads(q, "q", tokens, d), _heads(k, "k", tokens, d)
    cos_sin_cache = unit_last_dim(cos_sin_cache)
    rot = cos_sin_cache.shape[-1]
    if cos_sin_cache.dim() != 2 or rot % 2 or not 0 < rot <= d:
        raise ValueError(f"cos_sin_cache must be [positions, R] with R even, 0 < R <= head size "
                         f"{d}; got {tuple(cos_sin_cache.shape)}")
    return positions, q, k, cos_sin_cache


def rotary_meta(q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor,
                is_neox: bool) -> dict:
    """The launch's compile-time sizes and warps, shared by every kernel that rotates."""
    d, half = q.shape[-1], cos_sin_cache.shape[-1] // 2
    return dict(IS_NEOX=is_neox, BLOCK_HQ=triton.next_power_of_2(q.shape[1]),
                BLOCK_HK=triton.next_power_of_2(k.shape[1]),
                BLOCK_HALF=triton.next_power_of_2(half),
                BLOCK_TAIL=triton.next_power_of_2(d - 2 * half) if d > 2 * half else 0,
                num_warps=4 if q.shape[1] * half <= 2048 else 8)


def rotary_embedding(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                     cos_sin_cache: torch.Tensor, is_neox: bool, *,
                     out: tuple[torch.Tensor, torch.Tensor] | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q[T, Hq, D] and k[T, Hk, D] by position, as reference.rotary_embedding.

    `out` is an optional (q_out, k_out) destination pair shaped like q and k.
    """
    positions, q, k, cos_sin_cache = check_rotary_inputs(positions, q, k, cos_sin_cache)
    q_out, k_out = (None, None) if out is None else out
    q_out, k_out = output_like(q, q_out, "out[0]"), output_like(k, k_out, "out[1]")
    tokens = positions.shape[0]
    if tokens:
        _rotary_kernel[(tokens,)](
            positions, q, k, cos_sin_cache, q_out, k_out, q.shape[1], k.shape[1],
            cos_sin_cache.shape[-1] // 2, q.shape[-1],
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos_sin_cache.stride(0),
            q_out.stride(0), q_out.stride(1), k_out.stride(0), k_out.stride(1),
            **rotary_meta(q, k, cos_sin_cache, is_neox))
    return q_out, k_out

"""Triton rotary position embedding of q and k, neox or GPT-J pairing, partial rotary.

One program per token rotates every query and key head of that token, reading the
token's cos/sin row once. How the cache was built (plain, Llama 3 scaled, ...) does not
matter here: it is any [positions, rot_dim] table of [cos | sin].
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotate_heads(src_ptr, dst_ptr, token, H, stride_st, stride_sh, stride_dt, stride_dh,
                  cos, sin, HALF, D, IS_NEOX: tl.constexpr, BLOCK_H: tl.constexpr,
                  BLOCK_HALF: tl.constexpr, BLOCK_TAIL: tl.constexpr):
    offs_h = tl.arange(0, BLOCK_H)
    offs_i = tl.arange(0, BLOCK_HALF)
    if IS_NEOX:
        dim_a = offs_i
        dim_b = offs_i + HALF
    else:
        dim_a = 2 * offs_i
        dim_b = 2 * offs_i + 1
    mask = (offs_h[:, None] < H) & (offs_i[None, :] < HALF)
    src = src_ptr + token * stride_st + offs_h[:, None] * stride_sh
    dst = dst_ptr + token * stride_dt + offs_h[:, None] * stride_dh
    a = tl.load(src + dim_a[None, :], mask=mask, other=0.0).to(tl.float32)
    b = tl.load(src + dim_b[None, :], mask=mask, other=0.0).to(tl.float32)
    out_ty = dst_ptr.dtype.element_ty
    tl.store(dst + dim_a[None, :], (a * cos - b * sin).to(out_ty), mask=mask)
    tl.store(dst + dim_b[None, :], (b * cos + a * sin).to(out_ty), mask=mask)
    if BLOCK_TAIL > 0:
        offs_t = 2 * HALF + tl.arange(0, BLOCK_TAIL)
        tail_mask = (offs_h[:, None] < H) & (offs_t[None, :] < D)
        tail = tl.load(src + offs_t[None, :], mask=tail_mask, other=0.0)
        tl.store(dst + offs_t[None, :], tail, mask=tail_mask)


@triton.jit
def _rotary_kernel(pos_ptr, q_ptr, k_ptr, cache_ptr, q_out_ptr, k_out_ptr, HQ, HK, HALF, D,
                   stride_qt, stride_qh, stride_kt, stride_kh, stride_cache,
                   stride_qot, stride_qoh, stride_kot, stride_koh,
                   IS_NEOX: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr,
                   BLOCK_HALF: tl.constexpr, BLOCK_TAIL: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + token).to(tl.int64)
    offs_i = tl.arange(0, BLOCK_HALF)
    row = cache_ptr + pos * stride_cache
    cos = tl.load(row + offs_i, mask=offs_i < HALF, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(row + HALF + offs_i, mask=offs_i < HALF, other=0.0).to(tl.float32)[None, :]
    _rotate_heads(q_ptr, q_out_ptr, token, HQ, stride_qt, stride_qh, stride_qot, stride_qoh,
                  cos, sin, HALF, D, IS_NEOX, BLOCK_HQ, BLOCK_HALF, BLOCK_TAIL)
    _rotate_heads(k_ptr, k_out_ptr, token, HK, stride_kt, stride_kh, stride_kot, stride_koh,
                  cos, sin, HALF, D, IS_NEOX, BLOCK_HK, BLOCK_HALF, BLOCK_TAIL)


def _heads(t: torch.Tensor, name: str, tokens: int, d: int) -> torch.Tensor:
    if t.dim() != 3 or t.shape[0] != tokens or t.shape[2] != d:
        raise ValueError(f"{name} must be [{tokens}, heads, {d}] (tokens of positions, head "
                         f"size of q); got {tuple(t.shape)}")
    return t if t.stride(-1) == 1 else t.contiguous()


def rotary_embedding(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                     cos_sin_cache: torch.Tensor, is_neox: bool, *,
                     out: tuple[torch.Tensor, torch.Tensor] | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q[T, Hq, D] and k[T, Hk, D] by position, as reference.rotary_embedding.

    `out` is an optional (q_out, k_out) destination pair shaped like q and k.
    """
    if positions.dim() != 1:
        raise ValueError(f"positions must be [T]; got {tuple(positions.shape)}")
    tokens, d = positions.shape[0], q.shape[-1]
    q, k = _heads(q, "q", tokens, d), _heads(k, "k", tokens, d)
    if cos_sin_cache.stride(-1) != 1:
        cos_sin_cache = cos_sin_cache.contiguous()
    rot = cos_sin_cache.shape[-1]
    if cos_sin_cache.dim() != 2 or rot % 2 or not 0 < rot <= d:
        raise ValueError(f"cos_sin_cache must be [positions, R] with R even, 0 < R <= head size "
                         f"{d}; got {tuple(cos_sin_cache.shape)}")
    q_out, k_out = (torch.empty(q.shape, dtype=q.dtype, device=q.device),
                    torch.empty(k.shape, dtype=k.dtype, device=k.device)) if out is None else out
    if tokens:
        half = rot // 2
        _rotary_kernel[(tokens,)](
            positions, q, k, cos_sin_cache, q_out, k_out, q.shape[1], k.shape[1], half, d,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos_sin_cache.stride(0),
            q_out.stride(0), q_out.stride(1), k_out.stride(0), k_out.stride(1),
            IS_NEOX=is_neox, BLOCK_HQ=triton.next_power_of_2(q.shape[1]),
            BLOCK_HK=triton.next_power_of_2(k.shape[1]),
            BLOCK_HALF=triton.next_power_of_2(half),
            BLOCK_TAIL=triton.next_power_of_2(d - rot) if d > rot else 0,
            num_warps=4 if q.shape[1] * half <= 2048 else 8)
    return q_out, k_out

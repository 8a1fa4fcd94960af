"""The K loops of the GEMM kernels (tiled, split-K and fused MoE) and their precision."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
"""log2(e): the attention kernels fold it into the softmax scale and use exp2."""
MIN_DOT = 16
"""The smallest side of a tl.dot operand; smaller tiles are padded up to it."""


def dot_precision(dtype: torch.dtype) -> str:
    """Exact fp32 products for fp32 inputs (the parity tests hold fp32 to 1e-4), not TF32."""
    return "ieee" if dtype == torch.float32 else "tf32"


@triton.jit
def dot_over_k(a_ptrs, w_ptrs, k_len, stride_ak, stride_wk, up_offset,
               GATED: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """fp32 [BLOCK_M, BLOCK_N] tile of A @ W over k_len columns, walking both pointer
    blocks along K; with GATED, also the tile of the up rows `up_offset` past W's."""
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(k_len, BLOCK_K)):
        k_left = k_len - k * BLOCK_K
        a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
        b = tl.load(w_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        if GATED:
            b_up = tl.load(w_ptrs + up_offset, mask=offs_k[:, None] < k_left, other=0.0)
            acc_up = tl.dot(a, b_up, acc_up, input_precision=PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        w_ptrs += BLOCK_K * stride_wk
    return acc, acc_up


@triton.jit
def dot_over_k_tma(x_desc, w_desc, row, col, up_col, k_len, GATED: tl.constexpr,
                   PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr):
    """dot_over_k with tiles loaded by TMA from descriptors of x and W: the tile at (row,
    col) of the product, and with GATED the up tile `up_col` columns further. What lies
    past an edge of x or W loads as zeros, so nothing is masked."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(k_len, BLOCK_K)):
        a = x_desc.load([row, k * BLOCK_K])
        b = w_desc.load([col, k * BLOCK_K])
        acc = tl.dot(a, b.T, acc, input_precision=PRECISION)
        if GATED:
            b_up = w_desc.load([col + up_col, k * BLOCK_K])
            acc_up = tl.dot(a, b_up.T, acc_up, input_precision=PRECISION)
    return acc, acc_up

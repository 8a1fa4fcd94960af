"""Split-K GEMM for decode shapes: few rows and a long K leave most SMs idle when only the
output is tiled, so extra programs each take a slice of K and write fp32 partials, and a
second pass sums them in a fixed order (deterministic, no atomics) and applies the
epilogue: bias, SiLU(gate) * up, the residual add, and optionally the RMSNorm that follows
a row-parallel projection, since that pass already holds whole output rows.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from shardline.kernels import _config
from shardline.kernels._config import autotune, interpreting
from shardline.kernels._dot import dot_over_k, dot_precision

SPLIT_K_MAX_M = 16
K_ALIGN = 32 if interpreting() else 256
_MIN_K_PER_SPLIT = 2 * K_ALIGN


def _split_config(bm: int, bn: int, bk: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk},
                         num_warps=warps, num_stages=stages)


SPLIT_CONFIGS = [
    _split_config(16, 32, 256, 4, 4),
    _split_config(16, 64, 64, 4, 4),
    _split_config(16, 64, 256, 4, 3),
    _split_config(16, 128, 128, 8, 3),
    _split_config(16, 128, 64, 4, 5),
]
_INTERPRETER_CONFIG = _split_config(32, 32, 32, 4, 1)


class NormEpilogue(NamedTuple):
    """RMSNorm of the finished rows: `weight` and `eps` of the norm, and where the rows go
    before the norm (`summed`, the residual stream the next layer adds to)."""

    weight: torch.Tensor
    eps: float
    summed: torch.Tensor


# Only decode-shaped products split (M <= SPLIT_K_MAX_M, one row tile), so M is no key.
@autotune(SPLIT_CONFIGS, key=["N", "K", "K_SPLIT"], fixed=_INTERPRETER_CONFIG)
@triton.jit(do_not_specialize_on_alignment=["M"])
def _matmul_partial_kernel(x_ptr, w_ptr, ws_ptr, M, N, K, K_SPLIT,
                           stride_xm, stride_xk, stride_wn, stride_wk,
                           stride_ws, stride_wm,
                           PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                           BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    num_n = tl.cdiv(N, BLOCK_N)
    pid_m = pid // num_n
    pid_n = pid % num_n

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k_start = split * K_SPLIT
    offs_k = k_start + tl.arange(0, BLOCK_K)
    k_end = tl.minimum(K, k_start + K_SPLIT)
    # As in the tiled kernel: the weight tile's offset in int64, the rest in int32 (x has
    # at most SPLIT_K_MAX_M rows), edges wrapped or clamped to valid rows and columns.
    col0 = pid_n * BLOCK_N
    in_n = tl.minimum(offs_n, N - 1) - col0
    x_ptrs = x_ptr + (offs_m % M)[:, None] * stride_xm + offs_k[None, :] * stride_xk
    w_ptrs = (w_ptr + col0.to(tl.int64) * stride_wn + in_n[None, :] * stride_wn
              + offs_k[:, None] * stride_wk)

    acc, _ = dot_over_k(x_ptrs, w_ptrs, k_end - k_start, stride_xk, stride_wk, 0,
                        False, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)

    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(ws_ptr + split * stride_ws + offs_m[:, None] * stride_wm + offs_n[None, :],
             acc, mask=mask)


@triton.jit
def _splitk_reduce_kernel(ws_ptr, bias_ptr, res_ptr, out_ptr, norm_w_ptr, sum_ptr, N,
                          eps, stride_ws, stride_wm, stride_rm, stride_rn,
                          stride_om, stride_on, stride_sm,
                          SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr,
                          HAS_RESIDUAL: tl.constexpr, SILU_MUL: tl.constexpr,
                          RMS_NORM: tl.constexpr, BLOCK_N: tl.constexpr):
    row = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    ws_ptrs = ws_ptr + row * stride_wm + offs_n
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_N,), dtype=tl.float32)
    # Unrolled, so the partials' loads are all in flight at once rather than one by one.
    for split in tl.static_range(0, SPLIT_K):
        acc += tl.load(ws_ptrs + split * stride_ws, mask=n_mask, other=0.0)
        if SILU_MUL:
            acc_up += tl.load(ws_ptrs + split * stride_ws + N, mask=n_mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        if SILU_MUL:
            acc_up += tl.load(bias_ptr + N + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    if SILU_MUL:
        acc = acc * tl.sigmoid(acc) * acc_up
    if HAS_RESIDUAL:
        acc += tl.load(res_ptr + row * stride_rm + offs_n * stride_rn, mask=n_mask,
                       other=0.0).to(tl.float32)
    if RMS_NORM:
        # One program holds the whole row. The norm reads the sum as stored (rounded to
        # the output dtype), as the unfused RMSNorm kernel would read it back.
        summed = acc.to(sum_ptr.dtype.element_ty)
        tl.store(sum_ptr + row * stride_sm + offs_n, summed, mask=n_mask)
        acc = summed.to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(acc * acc, axis=0) / N + eps)
        acc = acc * rstd * tl.load(norm_w_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_om + offs_n * stride_on,
             acc.to(out_ptr.dtype.element_ty), mask=n_mask)


def choose_split_k(m: int, n: int, k: int, device: torch.device) -> int:
    """How many K slices to run for an [m, k] x [k, n] product: 1 means no split.

    Splits only decode-shaped products (m <= SPLIT_K_MAX_M), and only as far as it takes
    to give every SM about two programs, keeping at least _MIN_K_PER_SPLIT of K each.
    """
    if m > SPLIT_K_MAX_M:
        return 1
    n_tiles = triton.cdiv(n, 64)
    return max(1, min(2 * _config.num_sms(device, on_cpu=4) // n_tiles, k // _MIN_K_PER_SPLIT))


def k_slices(x: torch.Tensor, weight: torch.Tensor, split_k: int | None) -> tuple[int, int]:
    """(slices, columns per slice) of K for x @ weight^T: `split_k` slices if given, else
    choose_split_k's, each a whole number of K_ALIGN columns; (1, _) means no split."""
    if split_k is not None and split_k < 1:
        raise ValueError(f"split_k must be None or >= 1; got {split_k}")
    m, k = x.shape
    split = choose_split_k(m, weight.shape[0], k, x.device) if split_k is None else split_k
    k_split = triton.cdiv(triton.cdiv(k, split), K_ALIGN) * K_ALIGN
    return triton.cdiv(k, k_split), k_split


def partials(x: torch.Tensor, weight: torch.Tensor, split: int, k_split: int) -> torch.Tensor:
    """fp32 [split, M, N]: slice s holds x @ weight^T over K columns [s k_split, (s+1)
    k_split), for a reduction pass to sum in order."""
    m, k = x.shape
    n_rows = weight.shape[0]
    ws = torch.empty(split, m, n_rows, dtype=torch.float32, device=x.device)
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n_rows, meta["BLOCK_N"]),
                         split)
    _matmul_partial_kernel[grid](
        x, weight, ws, m, n_rows, k, k_split,
        *x.stride(), *weight.stride(), ws.stride(0), ws.stride(1),
        PRECISION=dot_precision(x.dtype))
    return ws


def split_k_gemm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 residual: torch.Tensor | None, out: torch.Tensor, silu_mul: bool,
                 split: int, k_split: int, norm: NormEpilogue | None = None) -> None:
    """out = epilogue(x @ weight^T) over `split` slices of `k_split` columns of K."""
    m, n = x.shape[0], out.shape[1]
    ws = partials(x, weight, split, k_split)
    # The norm needs whole rows in one program; otherwise rows are cut in 1024-wide blocks.
    block_n = triton.next_power_of_2(n) if norm else min(1024, triton.next_power_of_2(n))
    summed = norm.summed if norm else out
    _splitk_reduce_kernel[(m, triton.cdiv(n, block_n))](
        ws, out if bias is None else bias, out if residual is None else residual, out,
        norm.weight if norm else out, summed, n, norm.eps if norm else 0.0,
        ws.stride(0), ws.stride(1), *(residual.stride() if residual is not None else (0, 0)),
        *out.stride(), summed.stride(0), SPLIT_K=split, HAS_BIAS=bias is not None,
        HAS_RESIDUAL=residual is not None, SILU_MUL=silu_mul, RMS_NORM=norm is not None,
        BLOCK_N=block_n, num_warps=min(16, max(4, block_n // 256)))

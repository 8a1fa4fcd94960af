"""Triton GEMM of a rank's weight shard: x[M, K] @ weight[N, K]^T with fused epilogues.

One tiled kernel serves `linear` (bias and residual add fused) and `linear_silu_mul`
(each program computes a gate tile and the matching up tile of the merged gate_up
weight, so SiLU(gate) * up never leaves registers). Decode-shaped calls (few rows, long
K) leave most SMs idle with plain tiling, so they split K over extra programs that write
fp32 partials, and a second pass sums them in a fixed order and applies the epilogue:
deterministic, no atomics.

On Hopper and newer GPUs the tiled kernel has a second way to load its tiles: TMA, the
copy engine that moves a whole tile from global to shared memory from one descriptor,
zero-filling what lies past the matrix edges. Its configs sit beside the pointer-load
ones, so tuning times both and keeps the faster per shape (and torch.matmul where that
beats both: see shardline.kernels._tuned).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from shardline.kernels._config import autotune, interpreting, shape_bucket

SPLIT_K_MAX_M = 16
_K_ALIGN = 32 if interpreting() else 256
_MIN_K_PER_SPLIT = 2 * _K_ALIGN


def _config(bm: int, bn: int, bk: int, warps: int, stages: int, **flags: bool) -> triton.Config:
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8, **flags},
                         num_warps=warps, num_stages=stages)


def _tile_config(bm: int, bn: int, bk: int, warps: int, stages: int, tma: bool = False
                 ) -> triton.Config:
    return _config(bm, bn, bk, warps, stages, TMA=tma)


# SiLU(gate) * up keeps two accumulators live: these tiles spill registers (or outgrow a
# block's shared memory) on sm_90 when gated, as bench/kernel_resources.py measures.
_UNGATED_ONLY = [
    _tile_config(128, 256, 64, 8, 3),
    _tile_config(128, 128, 64, 4, 4),
    _tile_config(16, 32, 256, 4, 4),
    _tile_config(128, 256, 64, 8, 3, tma=True),
    _tile_config(128, 128, 64, 4, 4, tma=True),
]
_TMA_CONFIGS = [c for c in _UNGATED_ONLY if c.kwargs["TMA"]] + [
    _tile_config(128, 128, 64, 8, 3, tma=True),
    _tile_config(128, 64, 64, 4, 4, tma=True),
    _tile_config(64, 128, 64, 4, 4, tma=True),
    _tile_config(64, 64, 64, 4, 4, tma=True),
]
_TILED_CONFIGS = [c for c in _UNGATED_ONLY if not c.kwargs["TMA"]] + [
    _tile_config(128, 128, 64, 8, 3),
    _tile_config(128, 64, 64, 4, 4),
    _tile_config(64, 128, 64, 4, 4),
    _tile_config(64, 64, 64, 4, 4),
    _tile_config(32, 64, 128, 4, 4),
    _tile_config(16, 64, 128, 4, 5),
    _tile_config(16, 128, 64, 4, 4),
    _tile_config(16, 64, 64, 4, 4),
] + _TMA_CONFIGS
_SPLIT_CONFIGS = [
    _config(16, 32, 256, 4, 4),
    _config(16, 64, 64, 4, 4),
    _config(16, 64, 256, 4, 3),
    _config(16, 128, 128, 8, 3),
    _config(16, 128, 64, 4, 5),
]
_INTERPRETER_CONFIG = _tile_config(32, 32, 32, 4, 1)
_INTERPRETER_SPLIT_CONFIG = _config(32, 32, 32, 4, 1)


@functools.cache
def tma_capable(device: torch.device) -> bool:
    """Whether kernels on `device` may load through TMA descriptors: a compiled kernel (not
    the interpreter) on a Hopper or newer GPU, with a triton that builds descriptors."""
    return (device.type == "cuda" and not interpreting()
            and hasattr(tl, "make_tensor_descriptor")
            and torch.cuda.get_device_capability(device)[0] >= 9)


def tma_eligible(x: torch.Tensor, k: int) -> bool:
    """Whether this GEMM may take a TMA config: 16-bit inputs whose rows of K elements are
    a multiple of 16 bytes (TMA's stride rule); the wrapper aligns the tensors."""
    return (x.dtype in (torch.float16, torch.bfloat16) and (k * x.element_size()) % 16 == 0
            and tma_capable(x.device))


def _fit_rows(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Tiles taller than the (bucketed) row count only add wasted work, gated calls skip
    the tiles that spill with two accumulators, and TMA tiles need a GPU and shape that
    take them: never time those."""
    rows = max(16, named_args["M_BUCKET"])
    excluded = _UNGATED_ONLY if kwargs["SILU_MUL"] else []
    tma = tma_eligible(named_args["x_ptr"], named_args["K"])
    return [c for c in configs if c.kwargs["BLOCK_M"] <= rows and c not in excluded
            and (tma or not c.kwargs.get("TMA"))]


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


# M only bounds rows (masks, wrapping), so its 16-divisibility buys nothing; specializing
# on it would compile a third binary per shape bucket (M = 1, M % 16 == 0, other).
@autotune(_TILED_CONFIGS, key=["M_BUCKET", "N", "K", "SILU_MUL"], fixed=_INTERPRETER_CONFIG,
          prune=_fit_rows)
@triton.jit(do_not_specialize_on_alignment=["M"])
def _matmul_kernel(x_ptr, w_ptr, bias_ptr, res_ptr, out_ptr, M, N, K, M_BUCKET,
                   stride_xm, stride_xk, stride_wn, stride_wk, stride_rm, stride_rn,
                   stride_om, stride_on,
                   HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                   SILU_MUL: tl.constexpr, PRECISION: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   GROUP_M: tl.constexpr, TMA: tl.constexpr):
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    # Grouped order: GROUP_M row tiles sweep the columns together, reusing W in L2.
    group_size = GROUP_M * num_n
    first_m = (pid // group_size) * GROUP_M
    rows_in_group = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group_size) % rows_in_group
    pid_n = (pid % group_size) // rows_in_group

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    if TMA:
        # The wrapper made both row-major with 16-byte aligned rows, as TMA requires.
        x_desc = tl.make_tensor_descriptor(x_ptr, shape=[M, K], strides=[stride_xm, 1],
                                           block_shape=[BLOCK_M, BLOCK_K])
        w_desc = tl.make_tensor_descriptor(w_ptr, shape=[2 * N if SILU_MUL else N, K],
                                           strides=[stride_wn, 1],
                                           block_shape=[BLOCK_N, BLOCK_K])
        acc, acc_up = dot_over_k_tma(x_desc, w_desc, pid_m * BLOCK_M, pid_n * BLOCK_N, N, K,
                                     SILU_MUL, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
    else:
        offs_k = tl.arange(0, BLOCK_K)
        # Out-of-range rows and columns wrap to valid ones (their results are never
        # stored), so only the K edge needs a load mask.
        safe_m = offs_m % M
        safe_n = offs_n % N
        x_ptrs = x_ptr + safe_m[:, None] * stride_xm + offs_k[None, :] * stride_xk
        w_ptrs = w_ptr + safe_n[None, :] * stride_wn + offs_k[:, None] * stride_wk
        acc, acc_up = dot_over_k(x_ptrs, w_ptrs, K, stride_xk, stride_wk, N * stride_wn,
                                 SILU_MUL, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)

    n_mask = offs_n < N
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        if SILU_MUL:
            acc_up += tl.load(bias_ptr + N + offs_n, mask=n_mask,
                              other=0.0).to(tl.float32)[None, :]
    if SILU_MUL:
        acc = acc * tl.sigmoid(acc) * acc_up
    mask = (offs_m[:, None] < M) & n_mask[None, :]
    rows = offs_m.to(tl.int64)[:, None]
    if HAS_RESIDUAL:
        acc += tl.load(res_ptr + rows * stride_rm + offs_n[None, :] * stride_rn,
                       mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows * stride_om + offs_n[None, :] * stride_on,
             acc.to(out_ptr.dtype.element_ty), mask=mask)


@autotune(_SPLIT_CONFIGS, key=["M_BUCKET", "N", "K", "K_SPLIT"], fixed=_INTERPRETER_SPLIT_CONFIG)
@triton.jit(do_not_specialize_on_alignment=["M"])
def _matmul_partial_kernel(x_ptr, w_ptr, ws_ptr, M, N, K, M_BUCKET, K_SPLIT,
                           stride_xm, stride_xk, stride_wn, stride_wk,
                           stride_ws, stride_wm,
                           PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                           BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                           GROUP_M: tl.constexpr):
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
    x_ptrs = x_ptr + (offs_m % M)[:, None] * stride_xm + offs_k[None, :] * stride_xk
    w_ptrs = w_ptr + (offs_n % N)[None, :] * stride_wn + offs_k[:, None] * stride_wk

    acc, _ = dot_over_k(x_ptrs, w_ptrs, k_end - k_start, stride_xk, stride_wk, 0,
                        False, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)

    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(ws_ptr + split * stride_ws + offs_m[:, None] * stride_wm + offs_n[None, :],
             acc, mask=mask)


@triton.jit
def _splitk_reduce_kernel(ws_ptr, bias_ptr, res_ptr, out_ptr, N, SPLIT_K,
                          stride_ws, stride_wm, stride_rm, stride_rn, stride_om, stride_on,
                          HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                          SILU_MUL: tl.constexpr, BLOCK_N: tl.constexpr):
    row = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    ws_ptrs = ws_ptr + row * stride_wm + offs_n
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for split in range(0, SPLIT_K):
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
    tl.store(out_ptr + row * stride_om + offs_n * stride_on,
             acc.to(out_ptr.dtype.element_ty), mask=n_mask)


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def choose_split_k(m: int, n: int, k: int, device: torch.device) -> int:
    """How many K slices to run for an [m, k] x [k, n] product: 1 means no split.

    Splits only decode-shaped products (m <= SPLIT_K_MAX_M), and only as far as it takes
    to give every SM about two programs, keeping at least _MIN_K_PER_SPLIT of K each.
    """
    if m > SPLIT_K_MAX_M:
        return 1
    n_tiles = triton.cdiv(n, 64)
    return max(1, min(2 * _num_sms(device) // n_tiles, k // _MIN_K_PER_SPLIT))


def _check(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
           rows: int) -> None:
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"x must be [M, K] and weight [N, K] with the same K; got x "
                         f"{tuple(x.shape)} and weight {tuple(weight.shape)}")
    if x.shape[1] == 0:
        raise ValueError(f"x must have K > 0; got {tuple(x.shape)}")
    if x.dtype != weight.dtype:
        raise ValueError(f"x and weight must share a dtype; got {x.dtype} and {weight.dtype}")
    if bias is not None and bias.shape != (rows,):
        raise ValueError(f"bias must be [{rows}]; got {tuple(bias.shape)}")


def _tma_scratch(size: int, alignment: int, stream: int | None) -> torch.Tensor:
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _tma_ready(t: torch.Tensor) -> torch.Tensor:
    """`t` as TMA reads it: rows 16-byte aligned (which tma_eligible's K ensures for a
    contiguous tensor) from a 16-byte aligned base. The check is the cheapest that holds
    for the tensors the engine passes; anything else is copied."""
    if t.is_contiguous() and t.data_ptr() % 16 == 0:
        return t
    return torch.empty_like(t, memory_format=torch.contiguous_format).copy_(t)


def _tiled(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
           residual: torch.Tensor | None, out: torch.Tensor, silu_mul: bool) -> None:
    m, k = x.shape
    n = out.shape[1]
    if tma_eligible(x, k):
        x, weight = _tma_ready(x), _tma_ready(weight)
        # A descriptor built in the kernel lives in scratch memory that triton asks its
        # allocator for at each launch; the allocator is per context (thread, task).
        triton.set_allocator(_tma_scratch)
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)
    _matmul_kernel[grid](
        x, weight, out if bias is None else bias, out if residual is None else residual, out,
        m, n, k, shape_bucket(m), *x.stride(), *weight.stride(),
        *(residual.stride() if residual is not None else (0, 0)), *out.stride(),
        HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None, SILU_MUL=silu_mul,
        PRECISION=_precision(x))


def _split_k(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
             residual: torch.Tensor | None, out: torch.Tensor, silu_mul: bool,
             split: int, k_split: int) -> None:
    m, k = x.shape
    n_rows, n = weight.shape[0], out.shape[1]
    ws = torch.empty(split, m, n_rows, dtype=torch.float32, device=x.device)
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n_rows, meta["BLOCK_N"]),
                         split)
    _matmul_partial_kernel[grid](
        x, weight, ws, m, n_rows, k, shape_bucket(m, SPLIT_K_MAX_M), k_split,
        *x.stride(), *weight.stride(), ws.stride(0), ws.stride(1), PRECISION=_precision(x))
    block_n = min(1024, triton.next_power_of_2(n))
    _splitk_reduce_kernel[(m, triton.cdiv(n, block_n))](
        ws, out if bias is None else bias, out if residual is None else residual, out, n, split,
        ws.stride(0), ws.stride(1), *(residual.stride() if residual is not None else (0, 0)),
        *out.stride(), HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None,
        SILU_MUL=silu_mul, BLOCK_N=block_n)


def _precision(x: torch.Tensor) -> str:
    """fp32 inputs multiply in full fp32 (the parity tests hold fp32 to 1e-4), not TF32."""
    return "ieee" if x.dtype == torch.float32 else "tf32"


def _gemm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
          residual: torch.Tensor | None, out: torch.Tensor | None, n: int, silu_mul: bool,
          split_k: int | None) -> torch.Tensor:
    m, k = x.shape
    if out is None:
        out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    elif out.shape != (m, n):
        raise ValueError(f"out must be [{m}, {n}]; got {tuple(out.shape)}")
    if split_k is not None and split_k < 1:
        raise ValueError(f"split_k must be None or >= 1; got {split_k}")
    if m == 0:
        return out
    split = choose_split_k(m, weight.shape[0], k, x.device) if split_k is None else split_k
    k_split = triton.cdiv(triton.cdiv(k, split), _K_ALIGN) * _K_ALIGN
    split = triton.cdiv(k, k_split)
    if split == 1:
        _tiled(x, weight, bias, residual, out, silu_mul)
    else:
        _split_k(x, weight, bias, residual, out, silu_mul, split, k_split)
    return out


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           residual: torch.Tensor | None = None, *, out: torch.Tensor | None = None,
           split_k: int | None = None) -> torch.Tensor:
    """x[M, K] @ weight[N, K]^T (+ bias[N]) (+ residual[M, N]), as reference.linear.

    `split_k` forces the number of K slices (None: chosen from the shape).
    """
    _check(x, weight, bias, weight.shape[0])
    shape = (x.shape[0], weight.shape[0])
    if residual is not None and residual.shape != shape:
        raise ValueError(f"residual must be {list(shape)}; got {tuple(residual.shape)}")
    return _gemm(x, weight, bias, residual, out, shape[1], silu_mul=False, split_k=split_k)


def linear_silu_mul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                    *, out: torch.Tensor | None = None,
                    split_k: int | None = None) -> torch.Tensor:
    """SiLU(gate) * up of a merged gate_up weight[2N, K] -> [M, N], as the reference."""
    _check(x, weight, bias, weight.shape[0])
    if weight.shape[0] % 2:
        raise ValueError(f"weight must have an even row count (gate, then up); got "
                         f"{weight.shape[0]}")
    return _gemm(x, weight, bias, None, out, weight.shape[0] // 2, silu_mul=True,
                 split_k=split_k)

"""Triton GEMM of a rank's weight shard: x[M, K] @ weight[N, K]^T with fused epilogues.

One tiled kernel serves `linear` (bias and residual add fused) and `linear_silu_mul`
(each program computes a gate tile and the matching up tile of the merged gate_up
weight, so SiLU(gate) * up never leaves registers). Decode-shaped calls (few rows, long
K) split K instead (shardline.kernels.matmul_split_k), whose reduction pass can also
apply the RMSNorm that follows a row-parallel projection: `linear_rms_norm`.

On Hopper and newer GPUs the tiled kernel has a second way to load its tiles: TMA, the
copy engine that moves a whole tile from global to shared memory from one descriptor,
zero-filling what lies past the matrix edges. Its configs sit beside the pointer-load
ones, so tuning times both and keeps the faster per shape (and torch.matmul where that
beats both: see shardline.kernels._tuned).
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
import triton
import triton.language as tl

from shardline.kernels import _config, matmul_split_k
from shardline.kernels._checks import check_same_dtype, output_like
from shardline.kernels._config import autotune, interpreting
from shardline.kernels._tuned import shape_bucket
from shardline.kernels._dot import dot_over_k, dot_over_k_tma, dot_precision
from shardline.kernels.norm import rms_norm


def _tile_config(bm: int, bn: int, bk: int, warps: int, stages: int, tma: bool = False
                 ) -> triton.Config:
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8,
                          "TMA": tma}, num_warps=warps, num_stages=stages)


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
    # The last resort: 40 KiB of shared memory even gated in fp32, where every tile above
    # outgrows a GPU with 99 KiB a block (sm_86, sm_89).
    _tile_config(16, 32, 64, 4, 2),
] + _TMA_CONFIGS
_INTERPRETER_CONFIG = _tile_config(32, 32, 32, 4, 1)


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


def pipeline_bytes(config: triton.Config, element_size: int, gated: bool) -> int:
    """The least shared memory a tile config needs: num_stages buffers, each an x tile and
    a weight tile (two when gated: gate and up)."""
    tile = config.kwargs
    weight_tiles = 2 if gated else 1
    return (config.num_stages * tile["BLOCK_K"] * element_size
            * (tile["BLOCK_M"] + weight_tiles * tile["BLOCK_N"]))


def _fit_rows(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Tiles taller than the (bucketed) row count only add wasted work, gated calls skip
    the tiles that spill with two accumulators, TMA tiles need a GPU and shape that take
    them, and a tile whose pipeline outgrows the GPU's shared memory (the largest tiles in
    fp32) cannot load: never time those."""
    x = named_args["x_ptr"]
    rows = max(16, named_args["M_BUCKET"])
    gated = kwargs["SILU_MUL"]
    excluded = _UNGATED_ONLY if gated else []
    tma = tma_eligible(x, named_args["K"])
    shared = _config.max_shared_memory(x.device)
    return [c for c in configs if c.kwargs["BLOCK_M"] <= rows and c not in excluded
            and (tma or not c.kwargs.get("TMA"))
            and pipeline_bytes(c, x.element_size(), gated) <= shared]


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
        # The weight tile's first row is offset in int64 (a weight may pass 2^31 elements),
        # the rest in int32; x's offsets fit int32 (the wrapper splits larger x). Rows of x
        # past the edge wrap and columns clamp to valid ones (neither is stored), so only
        # the K edge needs a load mask.
        col0 = pid_n * BLOCK_N
        in_n = tl.minimum(offs_n, N - 1) - col0
        x_ptrs = x_ptr + (offs_m % M)[:, None] * stride_xm + offs_k[None, :] * stride_xk
        w_ptrs = (w_ptr + col0.to(tl.int64) * stride_wn + in_n[None, :] * stride_wn
                  + offs_k[:, None] * stride_wk)
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


def check_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
                 ) -> torch.Tensor | None:
    """Refuse an x, weight and bias whose shapes or dtypes do not go together; returns the
    bias contiguous (the kernels read it at unit stride)."""
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"x must be [M, K] and weight [N, K] with the same K; got x "
                         f"{tuple(x.shape)} and weight {tuple(weight.shape)}")
    if x.shape[1] == 0:
        raise ValueError(f"x must have K > 0; got {tuple(x.shape)}")
    if x.dtype != weight.dtype:
        raise ValueError(f"x and weight must share a dtype; got {x.dtype} and {weight.dtype}")
    if bias is None:
        return None
    if bias.shape != weight.shape[:1]:
        raise ValueError(f"bias must be [{weight.shape[0]}]; got {tuple(bias.shape)}")
    check_same_dtype(x, bias=bias)
    return bias.contiguous()


_INT32_MAX = 2**31 - 1


@functools.cache
def _tma_scratch_on(device: torch.device) -> Callable[[int, int, int | None], torch.Tensor]:
    """Triton's allocator for descriptor scratch, on the device of the tensors described
    (not the current one, which may differ where one process drives several GPUs)."""
    def allocate(size: int, alignment: int, stream: int | None) -> torch.Tensor:
        return torch.empty(size, dtype=torch.int8, device=device)
    return allocate


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
    rows = max(1, _INT32_MAX // max(1, x.stride(0)))
    if m > rows:   # the kernel offsets x's rows in int32: launch slices of x that fit
        for start in range(0, m, rows):
            part = slice(start, start + rows)
            _tiled(x[part], weight, bias, None if residual is None else residual[part],
                   out[part], silu_mul)
        return
    if tma_eligible(x, k):
        x, weight = _tma_ready(x), _tma_ready(weight)
        # A descriptor built in the kernel lives in scratch memory that triton asks its
        # allocator for at each launch; the allocator is per context (thread, task).
        triton.set_allocator(_tma_scratch_on(x.device))
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)
    _matmul_kernel[grid](
        x, weight, out if bias is None else bias, out if residual is None else residual, out,
        m, n, k, shape_bucket(m), *x.stride(), *weight.stride(),
        *(residual.stride() if residual is not None else (0, 0)), *out.stride(),
        HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None, SILU_MUL=silu_mul,
        PRECISION=dot_precision(x.dtype))


def _output(x: torch.Tensor, out: torch.Tensor | None, n: int) -> torch.Tensor:
    return output_like(x, out, shape=(x.shape[0], n))


def _gemm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
          residual: torch.Tensor | None, out: torch.Tensor | None, n: int, silu_mul: bool,
          split_k: int | None, norm: matmul_split_k.NormEpilogue | None = None
          ) -> torch.Tensor:
    """The epilogue (bias, SiLU * up, residual) of x @ weight^T into `out`; with `norm`,
    `out` gets the RMSNorm of that sum, which goes to norm.summed."""
    out = _output(x, out, n)
    split, k_split = matmul_split_k.k_slices(x, weight, split_k)
    if x.shape[0] == 0:
        return out
    if split > 1:
        matmul_split_k.split_k_gemm(x, weight, bias, residual, out, silu_mul, split, k_split,
                                    norm)
    elif norm is None:
        _tiled(x, weight, bias, residual, out, silu_mul)
    else:
        _tiled(x, weight, bias, residual, norm.summed, silu_mul)
        rms_norm(norm.summed, norm.weight, norm.eps, out=out)
    return out


def _check_residual(x: torch.Tensor, residual: torch.Tensor | None, n: int) -> None:
    if residual is None:
        return
    if residual.shape != (x.shape[0], n):
        raise ValueError(f"residual must be [{x.shape[0]}, {n}]; got {tuple(residual.shape)}")
    check_same_dtype(x, residual=residual)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           residual: torch.Tensor | None = None, *, out: torch.Tensor | None = None,
           split_k: int | None = None) -> torch.Tensor:
    """x[M, K] @ weight[N, K]^T (+ bias[N]) (+ residual[M, N]), as reference.linear.

    `split_k` forces the number of K slices (None: chosen from the shape).
    """
    bias = check_linear(x, weight, bias)
    _check_residual(x, residual, weight.shape[0])
    return _gemm(x, weight, bias, residual, out, weight.shape[0], silu_mul=False,
                 split_k=split_k)


def linear_silu_mul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                    *, out: torch.Tensor | None = None,
                    split_k: int | None = None) -> torch.Tensor:
    """SiLU(gate) * up of a merged gate_up weight[2N, K] -> [M, N], as the reference."""
    bias = check_linear(x, weight, bias)
    if weight.shape[0] % 2:
        raise ValueError(f"weight must have an even row count (gate, then up); got "
                         f"{weight.shape[0]}")
    return _gemm(x, weight, bias, None, out, weight.shape[0] // 2, silu_mul=True,
                 split_k=split_k)


def linear_rms_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    residual: torch.Tensor, norm_weight: torch.Tensor, eps: float, *,
                    split_k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMSNorm(s), s) for s = x @ weight^T (+ bias) + residual, as the reference.

    On the split-K path the reduction pass adds, stores s and normalizes it: one launch
    fewer than a GEMM followed by the norm. Tiled, the residual add rides the GEMM's
    epilogue and the norm follows.
    """
    bias = check_linear(x, weight, bias)
    n = weight.shape[0]
    _check_residual(x, residual, n)
    if norm_weight.shape != (n,):
        raise ValueError(f"norm_weight must be [{n}] (weight's rows); got "
                         f"{tuple(norm_weight.shape)}")
    norm = matmul_split_k.NormEpilogue(norm_weight.contiguous(), eps, _output(x, None, n))
    return _gemm(x, weight, bias, residual, None, n, False, split_k, norm), norm.summed

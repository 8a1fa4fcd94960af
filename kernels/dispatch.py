"""The one place that chooses, per call, between a Triton kernel and its torch reference.

The choice depends on the tensor's device and on two environment variables that are read
once per process (see `triton_enabled`); for a linear on CUDA, also on the GPU's tuned
table (see shardline.kernels._tuned and `_triton_linear`)."""

from __future__ import annotations

import os
from typing import Any, Callable

import torch

from shardline.kernels import reference
from shardline.kernels._checks import check_qkv_weight
from shardline.kernels._tuned import linear_prefers_torch


_choice: tuple[bool, bool] | None = None


def _read_environment() -> tuple[bool, bool]:
    global _choice
    _choice = (os.environ.get("SHARDLINE_DISABLE_TRITON") == "1",
               os.environ.get("SHARDLINE_FORCE_TRITON") == "1")
    return _choice


def reset_triton_choice() -> None:
    """Forget the choice so the next kernel call reads SHARDLINE_DISABLE_TRITON and
    SHARDLINE_FORCE_TRITON again: for code (tests, benches) that changes them in-process."""
    global _choice
    _choice = None


def _triton_for(on_cuda: bool) -> bool:
    disabled, forced = _choice or _read_environment()
    return not disabled and (on_cuda or forced)


def triton_enabled(device: torch.device) -> bool:
    """Triton on CUDA devices unless SHARDLINE_DISABLE_TRITON=1; on the CPU only when
    SHARDLINE_FORCE_TRITON=1 (which also keeps every CUDA linear in Triton). The variables
    are read on the first call, not on every kernel call (two environment reads cost about
    3 us, hundreds per eager step)."""
    return _triton_for(device.type == "cuda")


def use_triton(t: torch.Tensor) -> bool:
    """Whether the op on tensor `t` runs the Triton kernel rather than its reference
    (`triton_enabled`'s rule, without building a device object on the hot path)."""
    return _triton_for(t.is_cuda)


def _triton_linear(x: torch.Tensor, weight: torch.Tensor, op: str,
                   heads: tuple[int, int, int] | None = None) -> bool:
    """Whether the linear `op` runs its Triton form: on the CPU where Triton is on at all;
    on CUDA unless the tuned table sends the shape to torch.matmul (or lacks it, without
    autotuning), and always under SHARDLINE_FORCE_TRITON=1."""
    if not use_triton(x):
        return False
    if not x.is_cuda:
        return True
    # Asked even when forced: it records the shape for bench/tune.py.
    prefers_torch = linear_prefers_torch(x, weight, op, heads)
    return not prefers_torch or (_choice or _read_environment())[1]


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           residual: torch.Tensor | None = None) -> torch.Tensor:
    """x[M, K] @ weight[N, K]^T (+ bias) (+ residual), split-K for decode shapes; on CUDA,
    torch.matmul (cuBLAS) where `_triton_linear` says so."""
    if _triton_linear(x, weight, "linear"):
        from shardline.kernels.matmul import linear as triton_op
        return triton_op(x, weight, bias, residual)
    return reference.linear(x, weight, bias, residual)


def linear_silu_mul(x: torch.Tensor, weight: torch.Tensor,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
    """SiLU(gate) * up of a merged gate_up weight[2N, K] -> [M, N] (cuBLAS as `linear`)."""
    if _triton_linear(x, weight, "silu_mul"):
        from shardline.kernels.matmul import linear_silu_mul as triton_op
        return triton_op(x, weight, bias)
    return reference.linear_silu_mul(x, weight, bias)


def linear_rms_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    residual: torch.Tensor, norm_weight: torch.Tensor, eps: float
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMSNorm(s), s) for s = x @ weight^T (+ bias) + residual: a row-parallel projection
    with the residual add and the norm after it, one kernel fewer on the split-K path; on
    CUDA, torch.matmul then the norm where `_triton_linear` says so."""
    if _triton_linear(x, weight, "rms_norm"):
        from shardline.kernels.matmul import linear_rms_norm as triton_op
        return triton_op(x, weight, bias, residual, norm_weight, eps)
    if use_triton(x):
        return _cublas_linear_rms_norm(x, weight, bias, residual, norm_weight, eps)
    return reference.linear_rms_norm(x, weight, bias, residual, norm_weight, eps)


def _cublas_linear_rms_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                            residual: torch.Tensor, norm_weight: torch.Tensor, eps: float
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    return rms_norm(reference.linear(x, weight, bias), norm_weight, eps, residual)


def qkv_rotary_and_write_kv_cache(x: torch.Tensor, weight: torch.Tensor,
                                  bias: torch.Tensor | None, positions: torch.Tensor,
                                  cos_sin_cache: torch.Tensor, is_neox: bool,
                                  k_cache: torch.Tensor, v_cache: torch.Tensor,
                                  slot_mapping: torch.Tensor, num_heads: int) -> torch.Tensor:
    """The fused QKV projection of x [T, H], its q and k rotated, k and v stored at their
    cache slots; returns the rotated q [T, Hq, D]. On the split-K path the rotary kernel
    does the projection's reduction; on CUDA, torch.matmul then the rotary kernel where
    `_triton_linear` says so."""
    if _triton_linear(x, weight, "qkv_rotary", (num_heads, *k_cache.shape[2:])):
        from shardline.kernels.rotary_kv_cache import qkv_rotary_and_write_kv_cache as op
        return op(x, weight, bias, positions, cos_sin_cache, is_neox, k_cache, v_cache,
                  slot_mapping, num_heads)
    if use_triton(x):
        return _cublas_qkv_rotary_and_write_kv_cache(
            x, weight, bias, positions, cos_sin_cache, is_neox, k_cache, v_cache,
            slot_mapping, num_heads)
    return reference.qkv_rotary_and_write_kv_cache(x, weight, bias, positions, cos_sin_cache,
                                                   is_neox, k_cache, v_cache, slot_mapping,
                                                   num_heads)


def _cublas_qkv_rotary_and_write_kv_cache(x: torch.Tensor, weight: torch.Tensor,
                                          bias: torch.Tensor | None, positions: torch.Tensor,
                                          cos_sin_cache: torch.Tensor, is_neox: bool,
                                          k_cache: torch.Tensor, v_cache: torch.Tensor,
                                          slot_mapping: torch.Tensor, num_heads: int
                                          ) -> torch.Tensor:
    check_qkv_weight(weight, num_heads, k_cache)
    q, k, v = reference.split_qkv(reference.linear(x, weight, bias), num_heads,
                                  *k_cache.shape[2:])
    return rotary_and_write_kv_cache(positions, q, k, v, cos_sin_cache, is_neox, k_cache,
                                     v_cache, slot_mapping)


def linear_forms(op: str) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """The Triton form and the torch.matmul form of a linear `op` (one of _tuned.LINEAR_OPS),
    each taking that op's arguments: what bench/tune.py times against each other."""
    from shardline.kernels import matmul, rotary_kv_cache
    forms = {"linear": (matmul.linear, reference.linear),
             "silu_mul": (matmul.linear_silu_mul, reference.linear_silu_mul),
             "rms_norm": (matmul.linear_rms_norm, _cublas_linear_rms_norm),
             "qkv_rotary": (rotary_kv_cache.qkv_rotary_and_write_kv_cache,
                            _cublas_qkv_rotary_and_write_kv_cache)}
    if op not in forms:
        raise ValueError(f"op must be one of {sorted(forms)}, got {op!r}")
    return forms[op]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None
             ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm over the last dim; with `residual`, returns (norm(x + r), x + r)."""
    if use_triton(x):
        from shardline.kernels.norm import rms_norm as triton_op
        return triton_op(x, weight, eps, residual)
    return reference.rms_norm(x, weight, eps, residual)


def rotary_embedding(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                     cos_sin_cache: torch.Tensor, is_neox: bool
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q[T, Hq, D] and k[T, Hk, D] by position (neox or GPT-J pairing)."""
    if use_triton(q):
        from shardline.kernels.rotary import rotary_embedding as triton_op
        return triton_op(positions, q, k, cos_sin_cache, is_neox)
    return reference.rotary_embedding(positions, q, k, cos_sin_cache, is_neox)


def write_kv_cache(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                   v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Store k, v [T, Hk, D] at their cache slots; a slot of -1 is skipped."""
    if use_triton(k):
        from shardline.kernels.kv_cache import write_kv_cache as triton_op
        return triton_op(k, v, k_cache, v_cache, slot_mapping)
    return reference.write_kv_cache(k, v, k_cache, v_cache, slot_mapping)


def rotary_and_write_kv_cache(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                              v: torch.Tensor, cos_sin_cache: torch.Tensor, is_neox: bool,
                              k_cache: torch.Tensor, v_cache: torch.Tensor,
                              slot_mapping: torch.Tensor) -> torch.Tensor:
    """Rotate q and k, store the rotated k and v at their cache slots (one kernel on the
    Triton path); returns the rotated q."""
    if use_triton(q):
        from shardline.kernels.rotary_kv_cache import rotary_and_write_kv_cache as triton_op
        return triton_op(positions, q, k, v, cos_sin_cache, is_neox, k_cache, v_cache,
                         slot_mapping)
    return reference.rotary_and_write_kv_cache(positions, q, k, v, cos_sin_cache, is_neox,
                                               k_cache, v_cache, slot_mapping)


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor,
                           scale: float) -> torch.Tensor:
    """One query token per sequence over its paged KV cache; on the CPU, the C++ kernel
    where it takes the dtype (see cpu_attention), else the torch reference."""
    if use_triton(q):
        from shardline.kernels.attention_decode import paged_decode_attention as triton_op
        return triton_op(q, k_cache, v_cache, block_tables, seq_lens, scale)
    from shardline.kernels import cpu_attention
    if cpu_attention.supports(q, k_cache, v_cache):
        return cpu_attention.paged_decode_attention(q, k_cache, v_cache, block_tables,
                                                    seq_lens, scale)
    return reference.paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale)


def paged_prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            block_tables: torch.Tensor, query_start_loc: torch.Tensor,
                            seq_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal varlen attention of query chunks over their paged KV cache; on the CPU, its
    one-token queries through the C++ decode kernel (see cpu_attention)."""
    if use_triton(q):
        from shardline.kernels.attention_prefill import paged_prefill_attention as triton_op
        return triton_op(q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, scale)
    from shardline.kernels import cpu_attention
    if cpu_attention.supports(q, k_cache, v_cache):
        return cpu_attention.paged_prefill_attention(q, k_cache, v_cache, block_tables,
                                                     query_start_loc, seq_lens, scale)
    return reference.paged_prefill_attention(q, k_cache, v_cache, block_tables,
                                             query_start_loc, seq_lens, scale)


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
              topk_weights: torch.Tensor, topk_ids: torch.Tensor,
              expert_offset: int = 0) -> torch.Tensor:
    """sum_k w_k * down(SiLU(gate) * up) over this rank's experts."""
    if use_triton(x):
        from shardline.kernels.moe import fused_moe as triton_op
        return triton_op(x, w13, w2, topk_weights, topk_ids, expert_offset)
    return reference.fused_moe(x, w13, w2, topk_weights, topk_ids, expert_offset)

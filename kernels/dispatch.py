"""The one place that chooses, per call, between a Triton kernel and its torch reference."""

from __future__ import annotations

import os

import torch

from shardline.kernels import reference


def use_triton(t: torch.Tensor) -> bool:
    """Triton for CUDA tensors unless disabled; for CPU tensors only when forced."""
    if os.environ.get("SHARDLINE_DISABLE_TRITON") == "1":
        return False
    if t.is_cuda:
        return True
    return os.environ.get("SHARDLINE_FORCE_TRITON") == "1"


linear = reference.linear
linear_silu_mul = reference.linear_silu_mul
rms_norm = reference.rms_norm
rotary_embedding = reference.rotary_embedding
write_kv_cache = reference.write_kv_cache
paged_decode_attention = reference.paged_decode_attention
paged_prefill_attention = reference.paged_prefill_attention
fused_moe = reference.fused_moe

"""Kernels of shardline, installed as `shardline.kernels`.

Every op here is one dispatch point: the Triton kernel on CUDA tensors (unless
SHARDLINE_DISABLE_TRITON=1), the torch reference in `reference.py` otherwise; for the
linear ops on CUDA, their torch.matmul (cuBLAS) form where this GPU's tuned table found it
faster or has no entry (see `_tuned`); for paged decode attention on the CPU, the C++
kernel (`cpu_attention.py`). SHARDLINE_FORCE_TRITON=1 runs the Triton kernels everywhere:
every linear on CUDA, and every op on CPU tensors too, which with TRITON_INTERPRET=1 is how
the engine is tested with the kernels switched on.
"""

from shardline.kernels.dispatch import (
    fused_moe,
    linear,
    linear_rms_norm,
    linear_silu_mul,
    paged_decode_attention,
    paged_prefill_attention,
    qkv_rotary_and_write_kv_cache,
    rms_norm,
    rotary_and_write_kv_cache,
    rotary_embedding,
    write_kv_cache,
)

__all__ = [
    "fused_moe",
    "linear",
    "linear_rms_norm",
    "linear_silu_mul",
    "paged_decode_attention",
    "paged_prefill_attention",
    "qkv_rotary_and_write_kv_cache",
    "rms_norm",
    "rotary_and_write_kv_cache",
    "rotary_embedding",
    "write_kv_cache",
]

"""A decoder layer's element-wise passes on the CPU in fp32, each one C++ pass
(shardline._cpu_kernels, csrc/cpu/elementwise.cpp) where torch runs several ops.

Profiling bench/throughput.py's workload on the CPU put 12-15% of the run in these passes
as torch ops: the residual add and RMSNorm (add, pow, mean, rsqrt and two multiplies, a
temporary each), SiLU(gate) * up (silu's temporary, then the multiply) and the rotary
embedding with the KV-cache write (a gather of the cos/sin rows, eight multiplies, four
concatenations and two index_copy_ calls per layer). The C++ passes read each row once,
while it is in cache, and split rows over torch's thread count where they are many.
They compute what kernels.reference computes, up to rounding (the sum of squares in a
different order, SiLU's exp to 2e-7), and only where `applies`: fp32 CPU tensors not
bound for Triton; everything else keeps the kernels' paths.
"""

from __future__ import annotations

import torch

from shardline import _cpu_kernels
from shardline.kernels.dispatch import use_triton


def applies(x: torch.Tensor) -> bool:
    """Whether the C++ passes take `x`: an fp32 CPU tensor that Triton does not take
    (SHARDLINE_FORCE_TRITON=1 runs the kernels on CPU tensors)."""
    return x.dtype == torch.float32 and x.is_cpu and not use_triton(x)


def _check(name: str, t: torch.Tensor, shape: tuple[int, ...]) -> None:
    """Refuse what the C++ pass would misread: it takes addresses of contiguous fp32."""
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} has shape {tuple(t.shape)}; expected {shape}")
    if t.dtype != torch.float32 or not t.is_cpu:
        raise ValueError(f"{name} is {t.dtype} on {t.device}; the pass takes fp32 CPU tensors")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None, sum_into_x: bool = False
             ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm of x [T, H] over H; with `residual`, (norm(x + residual), x + residual) as
    kernels.rms_norm. `sum_into_x` stores the sum in x itself, for a caller that owns x
    (a projection's fresh output) and would otherwise pay for another [T, H] tensor."""
    x = x.contiguous()
    rows, hidden = x.shape
    _check("x", x, (rows, hidden))
    _check("weight", weight, (hidden,))
    weight = weight.contiguous()
    out = torch.empty_like(x)
    summed = None
    if residual is not None:
        residual = residual.contiguous()
        _check("residual", residual, (rows, hidden))
        summed = x if sum_into_x else torch.empty_like(x)
    _cpu_kernels.rms_norm(x.data_ptr(), 0 if residual is None else residual.data_ptr(),
                          weight.data_ptr(), out.data_ptr(),
                          0 if summed is None else summed.data_ptr(), rows, hidden,
                          float(eps), torch.get_num_threads())
    return out if summed is None else (out, summed)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) * up of a merged projection's output [T, 2N] (gate columns first) -> [T, N]."""
    gate_up = gate_up.contiguous()
    rows, double = gate_up.shape
    if double % 2:
        raise ValueError(f"gate_up has {double} columns; expected an even count (gate, up)")
    _check("gate_up", gate_up, (rows, double))
    out = gate_up.new_empty(rows, double // 2)
    _cpu_kernels.silu_mul(gate_up.data_ptr(), out.data_ptr(), rows, double // 2,
                          torch.get_num_threads())
    return out


def rotary_and_write_kv_cache(qkv: torch.Tensor, num_heads: int, positions: torch.Tensor,
                              cos_sin_cache: torch.Tensor, k_cache: torch.Tensor,
                              v_cache: torch.Tensor, slot_mapping: torch.Tensor
                              ) -> torch.Tensor:
    """A QKV projection's output [T, (Hq + 2 Hk) D] -> q [T, Hq, D] rotated by `positions`
    (neox pairing, as kernels.rotary_and_write_kv_cache with is_neox), its k rotated and v
    stored at their `slot_mapping` slots of the caches [blocks, block_size, Hk, D] (a slot
    of -1 is skipped). Raises IndexError for a position past the cos/sin table or a slot
    past the cache."""
    qkv = qkv.contiguous()
    tokens = qkv.shape[0]
    num_blocks, block_size, num_kv_heads, head_dim = k_cache.shape
    _check("qkv", qkv, (tokens, (num_heads + 2 * num_kv_heads) * head_dim))
    _check("v_cache", v_cache, tuple(k_cache.shape))
    _check("k_cache", k_cache, tuple(k_cache.shape))
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("k_cache and v_cache must be contiguous (slots are written in place)")
    cos_sin = cos_sin_cache.contiguous()
    _check("cos_sin_cache", cos_sin, tuple(cos_sin.shape))
    positions = positions.to(torch.int64).contiguous()
    slots = slot_mapping.to(torch.int64).contiguous()
    for name, t in (("positions", positions), ("slot_mapping", slots)):
        if t.shape != (tokens,):
            raise ValueError(f"{name} has shape {tuple(t.shape)}; expected ({tokens},)")
    q = qkv.new_empty(tokens, num_heads, head_dim)
    _cpu_kernels.rotary_write_kv(
        qkv.data_ptr(), positions.data_ptr(), cos_sin.data_ptr(), slots.data_ptr(),
        q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), tokens, num_heads, num_kv_heads,
        head_dim, cos_sin.shape[1], cos_sin.shape[0], num_blocks * block_size,
        torch.get_num_threads())
    return q

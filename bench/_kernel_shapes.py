"""The shapes bench/kernels.py times its kernels at: a Llama-3-8B-like layer sharded
TP=1/2/8 and a Mixtral-like MoE layer (bench/kernel_launches.py compiles the same)."""

from __future__ import annotations

from dataclasses import dataclass

TP_SIZES = (1, 2, 8)


@dataclass(frozen=True)
class Shapes:
    """Model and batch shapes of one bench run."""

    hidden: int
    intermediate: int
    q_heads: int
    kv_heads: int
    head_dim: int
    experts: int
    top_k: int
    block_size: int
    matmul_m: tuple[int, ...]
    decode: tuple[tuple[int, int], ...]
    prefill: tuple[tuple[int, int], ...]
    moe_tokens: int


FULL = Shapes(hidden=4096, intermediate=14336, q_heads=32, kv_heads=8, head_dim=128,
              experts=8, top_k=2, block_size=16, matmul_m=(1, 16, 512, 4096),
              decode=((64, 2048), (8, 32768)), prefill=((4, 2048), (1, 8192)),
              moe_tokens=64)
TINY = Shapes(hidden=64, intermediate=128, q_heads=16, kv_heads=8, head_dim=16,
              experts=8, top_k=2, block_size=16, matmul_m=(4, 16, 64),
              decode=((2, 40),), prefill=((2, 24),), moe_tokens=8)


def llama_gemms(s: Shapes, tp: int) -> list[tuple[str, int, int]]:
    """(name, N, K) of the four GEMMs of a Llama layer on one of `tp` ranks."""
    return [("qkv", (s.q_heads + 2 * s.kv_heads) * s.head_dim // tp, s.hidden),
            ("o", s.hidden, s.q_heads * s.head_dim // tp),
            ("gate_up", 2 * s.intermediate // tp, s.hidden),
            ("down", s.hidden, s.intermediate // tp)]

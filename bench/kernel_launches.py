"""The Triton launches that shardline's kernel wrappers make for the bench shapes, found
without a GPU.

Each wrapper (`linear`, `paged_decode_attention`, `fused_moe`, ...) is called on meta
tensors (shapes, strides and dtypes, no memory) while every kernel of its module is
swapped for a recorder. So the arguments, constexprs and launch options recorded are the
ones the wrapper really computes; the compile then specializes them by triton's own rule.
Shapes are bench/kernels.py's (a Llama-3-8B-like layer at TP=1/2/8, a Mixtral-like MoE
layer) plus attention at head sizes 64/128/256 and GQA groups 1/4/8.
"""

from __future__ import annotations

import importlib
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import triton

from _h100 import H100_SMS, as_on_h100
from _kernel_shapes import FULL, TP_SIZES, llama_gemms

DTYPES = (torch.bfloat16, torch.float16)
HEAD_DIMS = (64, 128, 256)
GROUPS = (1, 4, 8)
DIRECT_DECODE = (256, 2048)
MODULES = ("attention_decode", "attention_prefill", "kv_cache", "matmul", "matmul_split_k",
           "moe", "norm", "rotary", "rotary_kv_cache")


@dataclass
class Launch:
    """One kernel launch of one listed shape: where the kernel lives and its arguments."""

    module: str
    kernel: str
    args: tuple
    kwargs: dict[str, Any]
    shape: str = ""


class _Recorder:
    """Stands in for a kernel: `kernel[grid](...)` records the call instead of running it."""

    def __init__(self, module: str, name: str, sink: list[Launch]) -> None:
        self.module, self.name, self.sink = module, name, sink

    def __getitem__(self, grid: object) -> Callable[..., None]:
        def record(*args: Any, **kwargs: Any) -> None:
            self.sink.append(Launch(self.module, self.name, args, kwargs))
        return record


@contextmanager
def _recording(sink: list[Launch]) -> Iterator[None]:
    """Swap every kernel of the kernel modules for a recorder, as on an H100 (see
    as_on_h100); restore them after."""
    modules = {short: importlib.import_module(f"shardline.kernels.{short}") for short in MODULES}
    swapped = []
    for short, module in modules.items():
        for name, value in vars(module).items():
            if isinstance(value, (triton.runtime.JITFunction, triton.runtime.Autotuner)):
                swapped.append((module, name, value))
                setattr(module, name, _Recorder(short, name, sink))
    try:
        with as_on_h100():
            yield
    finally:
        for module, name, value in swapped:
            setattr(module, name, value)


def _meta(*shape: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(*shape, dtype=dtype, device="meta")


def _matmul_calls(dtype: torch.dtype, tps: tuple[int, ...], ms: tuple[int, ...]
                  ) -> Iterator[tuple[str, Callable[[], object]]]:
    from shardline.kernels import matmul, rotary_kv_cache
    s = FULL
    for tp in tps:
        for name, n, k in llama_gemms(s, tp):
            for m in ms:
                x, w = _meta(m, k, dtype=dtype), _meta(n, k, dtype=dtype)
                label = f"matmul TP{tp} {name} M={m} N={n} K={k}"
                if name == "qkv":
                    # The attention layer projects, rotates and stores K and V in one op;
                    # split-K, the rotary kernel sums the projection's partials.
                    hq, hk = s.q_heads // tp, max(1, s.kv_heads // tp)
                    cache = _meta(m, 16, hk, s.head_dim, dtype=dtype)
                    p, sl = _meta(m, dtype=torch.int64), _meta(m, dtype=torch.int64)
                    cs = _meta(8192, s.head_dim, dtype=torch.float32)
                    yield f"{label} +rotary+kv-cache", (
                        lambda x=x, w=w, c=cache, p=p, sl=sl, cs=cs, hq=hq:
                        rotary_kv_cache.qkv_rotary_and_write_kv_cache(x, w, None, p, cs, True, c,
                                                                      c, sl, hq))
                elif name == "gate_up":
                    yield label, lambda x=x, w=w: matmul.linear_silu_mul(x, w)
                elif name in ("o", "down") and tp == 1:
                    # Without a TP all-reduce after it, the row-parallel layer fuses the
                    # residual add and the next RMSNorm into its GEMM.
                    r, g = _meta(m, n, dtype=dtype), _meta(n, dtype=dtype)
                    yield f"{label} +residual+norm", (
                        lambda x=x, w=w, r=r, g=g: matmul.linear_rms_norm(x, w, None, r, g, 1e-6))
                else:
                    yield label, lambda x=x, w=w: matmul.linear(x, w)


def _attention_layouts(quick: bool) -> list[tuple[str, int, int, int]]:
    """(label, query heads, KV heads, head size) per rank."""
    s = FULL
    if quick:
        return [("TP1", s.q_heads, s.kv_heads, d) for d in (s.head_dim, 256)]
    layouts = [(f"TP{tp}", s.q_heads // tp, s.kv_heads // tp, s.head_dim)
               for tp in TP_SIZES]
    layouts += [(f"G{g}", 8 * g, 8, d) for d in HEAD_DIMS for g in GROUPS
                if (d, g) != (s.head_dim, s.q_heads // s.kv_heads)]
    return layouts


def _attention_calls(dtype: torch.dtype, quick: bool
                     ) -> Iterator[tuple[str, Callable[[], object]]]:
    from shardline.kernels import (attention_decode, attention_prefill, kv_cache, rotary,
                                   rotary_kv_cache)
    block = FULL.block_size
    decode_shapes = ((DIRECT_DECODE, FULL.decode[0]) if quick
                     else (*FULL.decode, DIRECT_DECODE))
    prefill_shapes = FULL.prefill[:1] if quick else FULL.prefill
    for layout, hq, hk, d in _attention_layouts(quick):
        tag = f"{layout} Hq={hq} Hk={hk} D={d}"
        for batch, context in decode_shapes:
            blocks = triton.cdiv(context, block)
            q = _meta(batch, hq, d, dtype=dtype)
            cache = _meta(batch * blocks, block, hk, d, dtype=dtype)
            tables = _meta(batch, blocks, dtype=torch.int32)
            lens = _meta(batch, dtype=torch.int32)
            splits = attention_decode.choose_splits(batch, hk, blocks * block, H100_SMS)
            yield (f"decode {tag} batch {batch} x {context}",
                   lambda q=q, c=cache, t=tables, n=lens, s=splits:
                   attention_decode.paged_decode_attention(q, c, c, t, n, d ** -0.5,
                                                           num_splits=s))
        for seqs, length in prefill_shapes:
            tokens, blocks = seqs * length, triton.cdiv(length, block)
            qkv = _meta(tokens, (hq + 2 * hk) * d, dtype=dtype)
            q = qkv[:, :hq * d].view(tokens, hq, d)
            k = qkv[:, hq * d:(hq + hk) * d].view(tokens, hk, d)
            cache = _meta(seqs * blocks, block, hk, d, dtype=dtype)
            tables = _meta(seqs, blocks, dtype=torch.int32)
            starts, lens = _meta(seqs + 1, dtype=torch.int32), _meta(seqs, dtype=torch.int32)
            slots = _meta(tokens, dtype=torch.int64)
            positions = _meta(tokens, dtype=torch.int64)
            cos_sin = _meta(8192, d, dtype=torch.float32)
            yield (f"prefill {tag} {seqs} x {length}",
                   lambda q=q, k=k, c=cache, t=tables, st=starts, n=lens, sl=slots,
                   p=positions, cs=cos_sin: (
                       rotary_kv_cache.rotary_and_write_kv_cache(p, q, k, k, cs, True, c, c, sl),
                       rotary.rotary_embedding(p, q, k, cs, True),
                       kv_cache.write_kv_cache(k, k, c, c, sl),
                       attention_prefill.paged_prefill_attention(q, c, c, t, st, n,
                                                                 d ** -0.5)))


def _moe_and_norm_calls(dtype: torch.dtype, quick: bool
                        ) -> Iterator[tuple[str, Callable[[], object]]]:
    from shardline.kernels import moe, norm
    s = FULL
    tps = (1,) if quick else TP_SIZES
    token_counts = (s.moe_tokens,) if quick else (s.moe_tokens, 512, 4096)
    for tp in tps:
        inter = s.intermediate // tp
        for tokens in token_counts:
            x = _meta(tokens, s.hidden, dtype=dtype)
            w13 = _meta(s.experts, 2 * inter, s.hidden, dtype=dtype)
            w2 = _meta(s.experts, s.hidden, inter, dtype=dtype)
            weights = _meta(tokens, s.top_k, dtype=dtype)
            ids = _meta(tokens, s.top_k, dtype=torch.int64)
            yield (f"moe TP{tp} {tokens} tokens top-{s.top_k} of {s.experts} I={inter}",
                   lambda x=x, a=w13, b=w2, w=weights, i=ids: moe.fused_moe(x, a, b, w, i))
    for tokens in ((64,) if quick else (1, 64, 4096)):
        x, weight = _meta(tokens, s.hidden, dtype=dtype), _meta(s.hidden, dtype=dtype)
        yield (f"rms_norm T={tokens} H={s.hidden} +residual",
               lambda x=x, w=weight: norm.rms_norm(x, w, 1e-5, x))


def capture(quick: bool = False) -> list[Launch]:
    """Every launch the wrappers make for the listed shapes (a CI-sized subset if quick)."""
    dtypes = DTYPES[:1] if quick else DTYPES
    launches: list[Launch] = []
    with _recording(launches):
        for dtype in dtypes:
            calls = [*_matmul_calls(dtype, (1,) if quick else TP_SIZES,
                                    (16, 512) if quick else FULL.matmul_m),
                     *_attention_calls(dtype, quick), *_moe_and_norm_calls(dtype, quick)]
            for label, call in calls:
                first = len(launches)
                call()
                for launch in launches[first:]:
                    launch.shape = f"{label} {str(dtype).removeprefix('torch.')}"
    return launches

"""Paged attention on the CPU: decode in C++ (shardline._cpu_kernels).

The torch reference gathers every sequence's blocks into a padded copy and then runs one
masked SDPA over it: on the CPU that copy, not the arithmetic, took most of a decode
step. The C++ kernel reads each block where it lies, only up to the sequence's length,
on torch's intra-op thread count.
"""

from __future__ import annotations

import torch

from shardline import _cpu_kernels
from shardline.kernels import reference

# A thread takes about 0.1 ms to start and join: with less K and V than this to read per
# thread, starting one costs more than the share of the work it takes.
MIN_BYTES_PER_THREAD = 512 << 10

DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16"}
if "float16" in _cpu_kernels.SUPPORTED_DTYPES:
    DTYPES[torch.float16] = "float16"


def supports(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> bool:
    """Whether the C++ kernel takes these operands: CPU tensors of one supported dtype, the
    caches contiguous (the engine's always are)."""
    return (q.is_cpu and q.dtype in DTYPES and k_cache.dtype == q.dtype
            and v_cache.dtype == q.dtype and k_cache.is_cpu and v_cache.is_cpu
            and k_cache.is_contiguous() and v_cache.is_contiguous())


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor,
                           scale: float, threads: int | None = None) -> torch.Tensor:
    """q[B, Hq, D] over each sequence's first seq_lens[b] cached tokens -> [B, Hq, D], as
    the reference computes it (fp32 arithmetic), without reading slots past a sequence's
    end. By default on torch's intra-op thread count, fewer for a small read; `threads`
    sets the count exactly. Errors name the argument: a shape, a length past the table, a
    block id past the cache."""
    batch, num_heads, head_dim = q.shape
    num_blocks, block_size, num_kv_heads, cache_dim = k_cache.shape
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache shape {tuple(v_cache.shape)} differs from k_cache's "
                         f"{tuple(k_cache.shape)}")
    if cache_dim != head_dim:
        raise ValueError(f"q's head_dim {head_dim} differs from the cache's {cache_dim}")
    if block_tables.dim() != 2 or block_tables.shape[0] != batch or seq_lens.shape != (batch,):
        raise ValueError(f"block_tables {tuple(block_tables.shape)} and seq_lens "
                         f"{tuple(seq_lens.shape)} must be [{batch}, max_blocks] and [{batch}]")
    q = q.contiguous()
    tables = block_tables.to(torch.int32)
    if tables.stride(1) != 1:
        tables = tables.contiguous()
    lens = seq_lens.to(torch.int32).contiguous()
    out = torch.empty_like(q)
    _cpu_kernels.paged_decode_attention(
        DTYPES[q.dtype], q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
        tables.data_ptr(), lens.data_ptr(), out.data_ptr(), batch, num_heads, num_kv_heads,
        head_dim, block_size, num_blocks, tables.shape[1], tables.stride(0), float(scale),
        threads or torch.get_num_threads(), 0 if threads else MIN_BYTES_PER_THREAD)
    return out


def paged_prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            block_tables: torch.Tensor, query_start_loc: torch.Tensor,
                            seq_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal varlen attention as the reference's: a step that mixes prompt chunks with
    decodes sends every one-token query through the decode kernel together, and each
    longer chunk through the reference's SDPA (whose blocked matmuls win there)."""
    starts = query_start_loc.tolist()
    q_lens = [end - start for start, end in zip(starts, starts[1:])]
    singles = [b for b, n in enumerate(q_lens) if n == 1]
    if len(singles) < 2:
        return reference.paged_prefill_attention(q, k_cache, v_cache, block_tables,
                                                 query_start_loc, seq_lens, scale)
    out = torch.zeros_like(q)
    index = torch.tensor(singles)
    rows = query_start_loc[index].long()
    out[rows] = paged_decode_attention(q[rows], k_cache, v_cache, block_tables[index],
                                       seq_lens[index], scale)
    lengths = seq_lens.tolist()
    for b, n in enumerate(q_lens):
        if n > 1:
            start = starts[b]
            out[start:start + n] = reference.sequence_attention(
                q[start:start + n], k_cache, v_cache, block_tables[b], lengths[b], scale)
    return out

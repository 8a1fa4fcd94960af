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

# With less K and V than this to read per thread, handing a share to another thread costs
# more than the share. Set when each call started and joined its threads (about 0.1 ms);
# the pool they come from now (csrc/cpu/thread_pool) costs 6-12 us a call on 2 cores, and
# the bound has not been measured again since.
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
    sets the count exactly. Errors name the argument: a shape, a device, a dtype, a
    non-contiguous cache, a length past the table, a block id past the cache."""
    _check_operands(q, k_cache, v_cache, block_tables, seq_lens)
    batch, num_heads, head_dim = q.shape
    num_blocks, block_size, num_kv_heads, _ = k_cache.shape
    q = q.contiguous()
    tables = _as_int32(block_tables, "block_tables")
    if tables.stride(1) != 1:
        tables = tables.contiguous()
    lens = _as_int32(seq_lens, "seq_lens").contiguous()
    out = torch.empty_like(q)
    _cpu_kernels.paged_decode_attention(
        DTYPES[q.dtype], q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
        tables.data_ptr(), lens.data_ptr(), out.data_ptr(), batch, num_heads, num_kv_heads,
        head_dim, block_size, num_blocks, tables.shape[1], tables.stride(0), float(scale),
        threads or torch.get_num_threads(), 0 if threads else MIN_BYTES_PER_THREAD)
    return out


def _check_operands(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    block_tables: torch.Tensor, seq_lens: torch.Tensor) -> None:
    """Refuse what the kernel would read as something it is not: it takes addresses and
    reads them as q's dtype in the documented layout, on the CPU."""
    if q.dim() != 3:
        raise ValueError(f"q must be [batch, num_heads, head_dim]; got shape {tuple(q.shape)}")
    if k_cache.dim() != 4:
        raise ValueError(f"k_cache must be [num_blocks, block_size, num_kv_heads, head_dim]; "
                         f"got shape {tuple(k_cache.shape)}")
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache shape {tuple(v_cache.shape)} differs from k_cache's "
                         f"{tuple(k_cache.shape)}")
    batch, _, head_dim = q.shape
    if k_cache.shape[3] != head_dim:
        raise ValueError(f"q's head_dim {head_dim} differs from the cache's {k_cache.shape[3]}")
    if block_tables.dim() != 2 or block_tables.shape[0] != batch or seq_lens.shape != (batch,):
        raise ValueError(f"block_tables {tuple(block_tables.shape)} and seq_lens "
                         f"{tuple(seq_lens.shape)} must be [{batch}, max_blocks] and [{batch}]")
    operands = {"q": q, "k_cache": k_cache, "v_cache": v_cache, "block_tables": block_tables,
                "seq_lens": seq_lens}
    for name, t in operands.items():
        if not t.is_cpu:
            raise ValueError(f"{name} is on {t.device}; the kernel takes CPU tensors")
    if q.dtype not in DTYPES:
        raise ValueError(f"q's dtype {q.dtype} is not one the kernel takes: "
                         f"{', '.join(map(str, DTYPES))}")
    for name in ("k_cache", "v_cache"):
        cache = operands[name]
        if cache.dtype != q.dtype:
            raise ValueError(f"{name}'s dtype {cache.dtype} differs from q's {q.dtype}")
        if not cache.is_contiguous():
            raise ValueError(f"{name} must be contiguous (its blocks are read in place); got "
                             f"strides {cache.stride()}")


def _as_int32(t: torch.Tensor, name: str) -> torch.Tensor:
    """`t` as int32, refused where it holds no integers or a value int32 cannot (the cast
    would wrap it to another, valid-looking one)."""
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise ValueError(f"{name} must hold integers; got {t.dtype}")
    if t.dtype != torch.int32 and t.numel():
        limits = torch.iinfo(torch.int32)
        low, high = int(t.min()), int(t.max())
        if low < limits.min or high > limits.max:
            raise ValueError(f"{name} holds {low if low < limits.min else high}, outside int32")
    return t.to(torch.int32)


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

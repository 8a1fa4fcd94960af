"""Triton varlen prefill attention over the paged KV cache, as chunked prefill needs.

Each sequence's query chunk is the last q_len of its seq_len tokens; its K/V (prefix and
new tokens alike) are already in the cache. One program computes one block of a
sequence's queries for one head with an online softmax, visiting only the key blocks at
or below the causal diagonal. The launch needs no host-side lengths (no device sync):
sequence b owns the programs from `query_start_loc[b] // BLOCK_M + b` on (T // BLOCK_M + B
in all, enough for every sequence's blocks), and each program finds its sequence by binary
search.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from shardline.kernels._checks import check_paged_attention, output_like, unit_last_dim
from shardline.kernels._config import autotune, jit_for_serving, up_to_head_size
from shardline.kernels._tuned import shape_bucket
from shardline.kernels._dot import LOG2E, MIN_DOT, dot_precision
from shardline.kernels.attention_decode import attend_tile


@triton.jit
def _find_sequence(query_start_loc_ptr, num_seqs, pid, BLOCK_M: tl.constexpr):
    """The last sequence b whose first program, query_start_loc[b] // BLOCK_M + b, is <= pid."""
    lo = pid * 0  # int32 tensors, so the loop-carried types never change
    hi = lo + num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        first = tl.load(query_start_loc_ptr + mid) // BLOCK_M + mid
        if first <= pid:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


def _config(block_m: int, block_n: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=warps,
                         num_stages=stages)


# Each config with the largest BLOCK_D it runs at without spilling registers on sm_90.
_CONFIGS, _fit_head_size = up_to_head_size([
    (_config(128, 64, 8, 3), 128),
    (_config(128, 32, 8, 3), 256),
    (_config(64, 64, 4, 3), 128),
    (_config(64, 64, 8, 2), 256),
    (_config(64, 32, 8, 2), 256),
    (_config(16, 64, 4, 3), 128),
    (_config(32, 32, 4, 2), 256),
])


@autotune(
    configs=_CONFIGS,
    key=["BLOCK_D", "KV_BLOCK_SIZE", "tokens_bucket"],
    fixed=triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=4, num_stages=1),
    prune=_fit_head_size,
)
@jit_for_serving(ints=("num_seqs", "stride_bt"),
                 pointers=("block_tables_ptr", "query_start_loc_ptr", "seq_lens_ptr"))
def _prefill_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, query_start_loc_ptr, seq_lens_ptr,
    out_ptr,
    qk_scale, num_seqs, group, head_dim, tokens_bucket,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_bt,
    stride_kc_block, stride_kc_slot, stride_kc_head,
    stride_vc_block, stride_vc_slot, stride_vc_head,
    KV_BLOCK_SIZE: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    head = tl.program_id(1)
    seq = _find_sequence(query_start_loc_ptr, num_seqs, pid, BLOCK_M)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_end = tl.load(query_start_loc_ptr + seq + 1)
    q_len = q_end - q_start
    # The last query blocks see the most keys: they go first, so the tail of the launch
    # is short work.
    num_slots = q_end // BLOCK_M - q_start // BLOCK_M + 1
    q_block = num_slots - 1 - (pid - (q_start // BLOCK_M + seq))
    if (q_block < 0) | (q_block * BLOCK_M >= q_len):
        return

    seq_len = tl.load(seq_lens_ptr + seq)
    rows = q_block * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < q_len
    q_pos = seq_len - q_len + rows
    dims = tl.arange(0, BLOCK_D)
    dim_mask = dims < head_dim
    io_mask = row_mask[:, None] & dim_mask[None, :]
    tokens = (q_start + rows).to(tl.int64)
    q = tl.load(q_ptr + tokens[:, None] * stride_qt + head * stride_qh + dims[None, :],
                mask=io_mask, other=0.0).to(k_cache_ptr.dtype.element_ty)

    kv_head = head // group
    block_table_row = block_tables_ptr + seq.to(tl.int64) * stride_bt
    m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # Keys below the block's first query position are visible to every row: no mask.
    first_pos = seq_len - q_len + q_block * BLOCK_M
    unmasked_end = (first_pos // BLOCK_N) * BLOCK_N
    for tile_start in range(0, unmasked_end, BLOCK_N):
        acc, m, l = attend_tile(q, acc, m, l, tile_start, q_pos, seq_len, k_cache_ptr,
                                v_cache_ptr, block_table_row, kv_head, dims, dim_mask,
                                stride_kc_block, stride_kc_slot, stride_kc_head,
                                stride_vc_block, stride_vc_slot, stride_vc_head, qk_scale,
                                KV_BLOCK_SIZE, BLOCK_N, False, DOT_PRECISION)
    kv_end = tl.minimum(seq_len, first_pos + BLOCK_M)
    for tile_start in range(unmasked_end, kv_end, BLOCK_N):
        acc, m, l = attend_tile(q, acc, m, l, tile_start, q_pos, seq_len, k_cache_ptr,
                                v_cache_ptr, block_table_row, kv_head, dims, dim_mask,
                                stride_kc_block, stride_kc_slot, stride_kc_head,
                                stride_vc_block, stride_vc_slot, stride_vc_head, qk_scale,
                                KV_BLOCK_SIZE, BLOCK_N, True, DOT_PRECISION)

    out = acc / l[:, None]
    tl.store(out_ptr + tokens[:, None] * stride_ot + head * stride_oh + dims[None, :],
             out.to(out_ptr.dtype.element_ty), mask=io_mask)


def paged_prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            block_tables: torch.Tensor, query_start_loc: torch.Tensor,
                            seq_lens: torch.Tensor, scale: float, *,
                            out: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention for varlen query chunks whose K/V are already in the cache.

    Sequence b's queries are q[query_start_loc[b]:query_start_loc[b+1]], the last q_len
    of its seq_lens[b] tokens; each attends to the cached prefix and to new tokens up to
    itself. `out` receives the result when given (same shape and dtype as q).
    """
    check_paged_attention(q, k_cache, v_cache, block_tables, seq_lens)
    if query_start_loc.shape != (block_tables.shape[0] + 1,):
        raise ValueError(f"query_start_loc must be [{block_tables.shape[0] + 1}] (B + 1 "
                         f"offsets); got {tuple(query_start_loc.shape)}")
    num_tokens, num_q_heads, head_dim = q.shape
    _, kv_block_size, num_kv_heads, _ = k_cache.shape
    num_seqs = block_tables.shape[0]
    out = output_like(q, out)
    if num_tokens == 0 or num_seqs == 0:
        return out
    q = unit_last_dim(q)
    block_tables = block_tables.contiguous()

    def grid(meta: dict) -> tuple[int, int]:
        return num_tokens // meta["BLOCK_M"] + num_seqs, num_q_heads

    _prefill_kernel[grid](
        q, k_cache, v_cache, block_tables, query_start_loc.contiguous(),
        seq_lens.contiguous(), out,
        scale * LOG2E, num_seqs, num_q_heads // num_kv_heads, head_dim,
        shape_bucket(num_tokens, 1 << 16),
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        KV_BLOCK_SIZE=kv_block_size, BLOCK_D=max(MIN_DOT, triton.next_power_of_2(head_dim)),
        DOT_PRECISION=dot_precision(k_cache.dtype),
    )
    return out

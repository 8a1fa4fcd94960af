"""Triton paged attention for decode: one query token per sequence over its cached keys.

One program serves all query heads of one KV group (packed as the rows of `tl.dot`, so
each K/V tile is read once per group, not once per query head) over one split of the
context. When batch x KV heads alone cannot fill the GPU, each sequence's context is split
evenly over extra programs and a second kernel merges the splits' partial outputs by their
log-sum-exp.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from shardline.kernels import _config
from shardline.kernels._checks import check_paged_attention, output_like, unit_last_dim
from shardline.kernels._config import autotune, interpreting, jit_for_serving, up_to_head_size
from shardline.kernels._dot import LOG2E, MIN_DOT, dot_precision

_MAX_SPLITS = 64
MERGE_WIDTH = 16


@triton.jit
def load_kv_tile(cache_ptr, block_table_row, tokens, token_mask, kv_head, dims, dim_mask,
                 stride_block, stride_slot, stride_head, KV_BLOCK_SIZE: tl.constexpr):
    """[tokens, dims] of one KV head, gathered through a sequence's block table."""
    blocks = tl.load(block_table_row + tokens // KV_BLOCK_SIZE, mask=token_mask, other=0)
    rows = blocks.to(tl.int64) * stride_block + (tokens % KV_BLOCK_SIZE) * stride_slot
    ptrs = cache_ptr + rows[:, None] + kv_head * stride_head + dims[None, :]
    return tl.load(ptrs, mask=token_mask[:, None] & dim_mask[None, :], other=0.0)


@triton.jit
def online_softmax_update(scores, v, acc, m, l, DOT_PRECISION: tl.constexpr):
    """Fold one tile of scores (log2 domain, masked keys at -inf) and its values into the
    running max m, normalizer l and unnormalized output acc; returns (acc, m, l)."""
    m_new = tl.maximum(m, tl.max(scores, 1))
    alpha = tl.exp2(m - m_new)
    p = tl.exp2(scores - m_new[:, None])
    l = l * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, m_new, l


@triton.jit
def attend_tile(q, acc, m, l, tile_start, q_pos, kv_end, k_cache_ptr, v_cache_ptr,
                block_table_row, kv_head, dims, dim_mask,
                stride_kc_block, stride_kc_slot, stride_kc_head,
                stride_vc_block, stride_vc_slot, stride_vc_head, qk_scale,
                KV_BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                DOT_PRECISION: tl.constexpr):
    """One online-softmax step over the keys of [tile_start, tile_start + BLOCK_N) below
    kv_end; with CAUSAL, query row r sees only keys at positions <= q_pos[r] (without it,
    every key of the tile must be visible to every row)."""
    tokens = tile_start + tl.arange(0, BLOCK_N)
    token_mask = tokens < kv_end
    k = load_kv_tile(k_cache_ptr, block_table_row, tokens, token_mask, kv_head, dims,
                     dim_mask, stride_kc_block, stride_kc_slot, stride_kc_head,
                     KV_BLOCK_SIZE)
    scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    if CAUSAL:
        visible = (tokens[None, :] <= q_pos[:, None]) & token_mask[None, :]
        scores = tl.where(visible, scores, float("-inf"))
    v = load_kv_tile(v_cache_ptr, block_table_row, tokens, token_mask, kv_head, dims,
                     dim_mask, stride_vc_block, stride_vc_slot, stride_vc_head,
                     KV_BLOCK_SIZE)
    return online_softmax_update(scores, v, acc, m, l, DOT_PRECISION)


# Each config with the largest BLOCK_D it runs at without spilling registers on sm_90.
_CONFIGS, _fit_head_size = up_to_head_size([
    (triton.Config({"BLOCK_N": 64}, num_warps=4, num_stages=2), 256),
    (triton.Config({"BLOCK_N": 64}, num_warps=4, num_stages=3), 64),
    (triton.Config({"BLOCK_N": 128}, num_warps=4, num_stages=2), 128),
    (triton.Config({"BLOCK_N": 128}, num_warps=8, num_stages=2), 128),
    (triton.Config({"BLOCK_N": 32}, num_warps=2, num_stages=4), 128),
    (triton.Config({"BLOCK_N": 64}, num_warps=8, num_stages=2), 256),
])


@autotune(
    configs=_CONFIGS,
    key=["BLOCK_G", "BLOCK_D", "KV_BLOCK_SIZE", "DIRECT"],
    fixed=triton.Config({"BLOCK_N": 16}, num_warps=4, num_stages=1),
    prune=_fit_head_size,
)
@jit_for_serving(ints=("num_splits", "stride_bt"), pointers=("block_tables_ptr", "seq_lens_ptr"))
def _decode_split_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr,
    out_ptr, part_out_ptr, part_lse_ptr,
    qk_scale, num_q_heads, group, head_dim, num_splits,
    stride_qb, stride_qh, stride_ob, stride_oh, stride_bt,
    stride_kc_block, stride_kc_slot, stride_kc_head,
    stride_vc_block, stride_vc_slot, stride_vc_head,
    KV_BLOCK_SIZE: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr, DIRECT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    SPLIT_ALIGN: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    # Each sequence spreads its own context over the splits, so a short sequence in a
    # batch sized for long ones (or in a CUDA graph sized for max_model_len) still uses
    # them all; splits past its end find no keys and drop out of the merge.
    seq_len = tl.load(seq_lens_ptr + seq)
    split_tokens = tl.cdiv(tl.cdiv(seq_len, num_splits), SPLIT_ALIGN) * SPLIT_ALIGN
    start = split * split_tokens
    end = tl.minimum(seq_len, start + split_tokens)

    members = tl.arange(0, BLOCK_G)
    heads = kv_head * group + members
    head_mask = members < group
    dims = tl.arange(0, BLOCK_D)
    dim_mask = dims < head_dim
    io_mask = head_mask[:, None] & dim_mask[None, :]

    q = tl.load(q_ptr + seq * stride_qb + heads[:, None] * stride_qh + dims[None, :],
                mask=io_mask, other=0.0).to(k_cache_ptr.dtype.element_ty)
    block_table_row = block_tables_ptr + seq.to(tl.int64) * stride_bt

    m = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    q_pos = tl.zeros([BLOCK_G], dtype=tl.int32) + (seq_len - 1)  # the decode query's position
    for tile_start in range(start, end, BLOCK_N):
        acc, m, l = attend_tile(q, acc, m, l, tile_start, q_pos, end, k_cache_ptr, v_cache_ptr,
                                block_table_row, kv_head, dims, dim_mask,
                                stride_kc_block, stride_kc_slot, stride_kc_head,
                                stride_vc_block, stride_vc_slot, stride_vc_head, qk_scale,
                                KV_BLOCK_SIZE, BLOCK_N, True, DOT_PRECISION)

    has_keys = l > 0.0
    acc = acc / tl.where(has_keys, l, 1.0)[:, None]
    if DIRECT:
        tl.store(out_ptr + seq * stride_ob + heads[:, None] * stride_oh + dims[None, :],
                 acc.to(out_ptr.dtype.element_ty), mask=io_mask)
    else:
        rows = (seq * num_q_heads + heads).to(tl.int64) * num_splits + split
        tl.store(part_out_ptr + rows[:, None] * head_dim + dims[None, :], acc, mask=io_mask)
        lse = tl.where(has_keys, m + tl.log2(tl.where(has_keys, l, 1.0)), float("-inf"))
        tl.store(part_lse_ptr + rows, lse, mask=head_mask)


@jit_for_serving(ints=("num_splits",))
def _merge_splits_kernel(
    part_out_ptr, part_lse_ptr, out_ptr,
    num_q_heads, head_dim, num_splits, stride_ob, stride_oh,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # The splits are read BLOCK_S at a time, a fixed width, so one compiled kernel serves
    # every split count an eager batch's context lengths lead to.
    seq = tl.program_id(0)
    head = tl.program_id(1)
    dims = tl.arange(0, BLOCK_D)
    dim_mask = dims < head_dim
    first_row = (seq * num_q_heads + head).to(tl.int64) * num_splits

    lse_max = tl.full([BLOCK_S], float("-inf"), dtype=tl.float32)
    for start in range(0, num_splits, BLOCK_S):
        splits = start + tl.arange(0, BLOCK_S)
        lse = tl.load(part_lse_ptr + first_row + splits, mask=splits < num_splits,
                      other=float("-inf"))
        lse_max = tl.maximum(lse_max, lse)
    top = tl.maximum(tl.max(lse_max, 0), -1e30)

    weights = tl.zeros([BLOCK_S], dtype=tl.float32)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for start in range(0, num_splits, BLOCK_S):
        splits = start + tl.arange(0, BLOCK_S)
        split_mask = splits < num_splits
        rows = first_row + splits
        weight = tl.exp2(tl.load(part_lse_ptr + rows, mask=split_mask, other=float("-inf"))
                         - top)
        parts = tl.load(part_out_ptr + rows[:, None] * head_dim + dims[None, :],
                        mask=split_mask[:, None] & dim_mask[None, :], other=0.0)
        weights += weight
        acc += tl.sum(parts * weight[:, None], 0)
    total = tl.sum(weights, 0)
    out = acc / tl.where(total > 0.0, total, 1.0)
    tl.store(out_ptr + seq * stride_ob + head * stride_oh + dims,
             out.to(out_ptr.dtype.element_ty), mask=dim_mask)


def choose_splits(batch: int, num_kv_heads: int, max_context: int, num_sms: int) -> int:
    """Enough context splits that about four programs run per SM, none under 256 tokens.

    A large batch fills the GPU by itself (one split, no merge kernel); a small batch
    with a long context is split so that the KV reads still spread over every SM.
    """
    wanted = triton.cdiv(4 * num_sms, batch * num_kv_heads)
    return max(1, min(wanted, triton.cdiv(max_context, 256), _MAX_SPLITS))


def split_align() -> int:
    """Tokens a split's length is a multiple of (fewer in the interpreter, so that tiny
    test contexts still split)."""
    return 16 if interpreting() else 128


def launched_splits(num_splits: int, max_context: int) -> int:
    """The splits a launch asked for `num_splits` runs: each split's length is rounded up
    to split_align() tokens, so fewer splits may cover `max_context`."""
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1; got {num_splits}")
    align = split_align()
    split_tokens = triton.cdiv(triton.cdiv(max_context, num_splits), align) * align
    return max(1, triton.cdiv(max_context, split_tokens))


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                           *, out: torch.Tensor | None = None,
                           num_splits: int | None = None) -> torch.Tensor:
    """One query token per sequence: q[B, Hq, D] over each sequence's seq_lens[b] cached keys.

    `out` receives the result when given (same shape and dtype as q). `num_splits` fixes
    how many parts the context is split into; by default it is chosen from the batch, the
    KV heads, the SM count and the longest context the block table can hold.
    """
    check_paged_attention(q, k_cache, v_cache, block_tables, seq_lens)
    if block_tables.shape[0] != q.shape[0]:
        raise ValueError(f"decode takes one query per sequence: q has {q.shape[0]} tokens, "
                         f"block_tables {block_tables.shape[0]} sequences")
    batch, num_q_heads, head_dim = q.shape
    _, kv_block_size, num_kv_heads, _ = k_cache.shape
    out = output_like(q, out)
    if batch == 0:
        return out
    if block_tables.shape[1] == 0:   # no sequence holds a block: each attends to nothing
        return out.zero_()
    q = unit_last_dim(q)
    block_tables, seq_lens = block_tables.contiguous(), seq_lens.contiguous()

    max_context = block_tables.shape[1] * kv_block_size
    if num_splits is None:
        num_splits = choose_splits(batch, num_kv_heads, max_context,
                                   _config.num_sms(q.device, on_cpu=1))
    num_splits = launched_splits(num_splits, max_context)
    direct = num_splits == 1

    group = num_q_heads // num_kv_heads
    block_d = max(MIN_DOT, triton.next_power_of_2(head_dim))
    if direct:
        part_out = part_lse = out
    else:
        part_out = torch.empty(batch, num_q_heads, num_splits, head_dim,
                               dtype=torch.float32, device=q.device)
        part_lse = torch.empty(batch, num_q_heads, num_splits, dtype=torch.float32,
                               device=q.device)
    _decode_split_kernel[(batch, num_kv_heads, num_splits)](
        q, k_cache, v_cache, block_tables, seq_lens,
        out, part_out, part_lse,
        scale * LOG2E, num_q_heads, group, head_dim, num_splits,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        KV_BLOCK_SIZE=kv_block_size, BLOCK_G=max(MIN_DOT, triton.next_power_of_2(group)),
        BLOCK_D=block_d, DIRECT=direct, DOT_PRECISION=dot_precision(k_cache.dtype),
        SPLIT_ALIGN=split_align(),
    )
    if not direct:
        _merge_splits_kernel[(batch, num_q_heads)](
            part_out, part_lse, out,
            num_q_heads, head_dim, num_splits, out.stride(0), out.stride(1),
            BLOCK_S=MERGE_WIDTH, BLOCK_D=block_d,
        )
    return out

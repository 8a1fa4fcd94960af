"""Triton fused mixture of experts: grouped GEMMs over tokens sorted by expert.

Each token's top-k choices are (token, k) pairs. `moe_align` sorts the pairs by local
expert and pads every expert's run to a multiple of BLOCK_M, so each row block of the
grouped GEMM belongs to a single expert and reads a single weight matrix. Two launches
follow: gate_up with SiLU(gate) * up in the epilogue, then down with the pair's top-k
weight applied in the epilogue; the k partial rows of a token are summed last, in fp32.
Pairs routed to experts another rank owns (expert parallelism) get blocks of their own
that skip the GEMMs and write zeros.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from shardline.kernels._checks import output_like
from shardline.kernels._config import autotune, interpreting, jit_for_serving
from shardline.kernels._tuned import shape_bucket
from shardline.kernels._dot import dot_over_k, dot_precision

NOT_OWNED = tl.constexpr(-1)
PAST_END = tl.constexpr(-2)


def _config(bn: int, bk: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=warps, num_stages=stages)


# gate_up keeps the gate and up tiles live at once: at 64-row blocks these spill
# registers or outgrow a block's shared memory on sm_90 (bench/kernel_resources.py).
_SMALL_GATE_UP_BLOCKS_ONLY = [
    _config(128, 64, 4, 4),
    _config(128, 128, 8, 3),
    _config(256, 64, 8, 3),
]
_CONFIGS = [
    _config(64, 64, 4, 4),
    _config(64, 128, 4, 3),
    _config(64, 32, 4, 4),
    *_SMALL_GATE_UP_BLOCKS_ONLY,
]


def _fit_block(configs: list[triton.Config], named_args: dict,
               **kwargs) -> list[triton.Config]:
    """The configs that fit on sm_90 for this call: gate_up over 64-row blocks drops
    those that would spill or overflow shared memory there."""
    if kwargs["GATE_UP"] and kwargs["BLOCK_M"] > 32:
        return [c for c in configs if c not in _SMALL_GATE_UP_BLOCKS_ONLY]
    return configs


@autotune(_CONFIGS, key=["PAIRS_BUCKET", "N", "K", "BLOCK_M", "GATE_UP"],
          fixed=_config(32, 32, 4, 1), prune=_fit_block)
@jit_for_serving(ints=("num_pairs",))
def _moe_gemm_kernel(a_ptr, w_ptr, out_ptr, sorted_pairs_ptr, block_experts_ptr,
                     topk_weights_ptr, num_pairs, N, K, PAIRS_BUCKET, PAIRS_PER_ROW,
                     stride_am, stride_ak, stride_we, stride_wn, stride_wk,
                     stride_om, stride_on,
                     GATE_UP: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """One tile of a grouped GEMM whose rows are the (token, k) pairs of one expert.

    Row r of A is pair // PAIRS_PER_ROW: the token's x row for gate_up (topk pairs per
    row), the pair's own activation row for down (one).
    """
    block = tl.program_id(0)
    expert = tl.load(block_experts_ptr + block)
    if expert == PAST_END:
        return
    if GATE_UP:
        if expert == NOT_OWNED:
            return
    offs_m = block * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(sorted_pairs_ptr + offs_m)
    valid = pair < num_pairs
    pair = tl.where(valid, pair, 0).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    out_ptrs = out_ptr + pair[:, None] * stride_om + offs_n[None, :] * stride_on
    out_mask = valid[:, None] & (offs_n[None, :] < N)
    if expert == NOT_OWNED:
        tl.store(out_ptrs, tl.zeros((BLOCK_M, BLOCK_N), dtype=out_ptr.dtype.element_ty),
                 mask=out_mask)
        return

    offs_k = tl.arange(0, BLOCK_K)
    a_rows = pair // PAIRS_PER_ROW
    a_ptrs = a_ptr + a_rows[:, None] * stride_am + offs_k[None, :] * stride_ak
    w_ptrs = (w_ptr + expert.to(tl.int64) * stride_we + (offs_n % N)[None, :] * stride_wn
              + offs_k[:, None] * stride_wk)
    acc, acc_up = dot_over_k(a_ptrs, w_ptrs, K, stride_ak, stride_wk, N * stride_wn,
                             GATE_UP, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)

    if GATE_UP:
        acc = acc * tl.sigmoid(acc) * acc_up
    else:
        acc *= tl.load(topk_weights_ptr + pair, mask=valid, other=0.0).to(tl.float32)[:, None]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _pair_buckets(ids_ptr, offs, num_pairs, expert_offset, num_experts):
    """Each pair's bucket: its local expert, num_experts if another rank owns the expert,
    -1 past the last pair (a bucket no one counts)."""
    local = tl.load(ids_ptr + offs, mask=offs < num_pairs, other=0).to(tl.int32) - expert_offset
    bucket = tl.where((local >= 0) & (local < num_experts), local, num_experts)
    return tl.where(offs < num_pairs, bucket, -1)


@jit_for_serving(ints=("num_pairs", "max_blocks"))
def _moe_align_kernel(ids_ptr, sorted_pairs_ptr, block_experts_ptr, num_pairs, expert_offset,
                      num_experts, max_blocks, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr,
                      CHUNK: tl.constexpr):
    buckets = tl.arange(0, BLOCK_E)
    counts = tl.zeros((BLOCK_E,), dtype=tl.int32)
    for start in range(0, num_pairs, CHUNK):
        pair_bucket = _pair_buckets(ids_ptr, start + tl.arange(0, CHUNK), num_pairs,
                                    expert_offset, num_experts)
        counts += tl.sum((pair_bucket[:, None] == buckets[None, :]).to(tl.int32), axis=0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    padded_end = tl.cumsum(padded, axis=0)
    padded_start = padded_end - padded

    for start in range(0, max_blocks, CHUNK):
        blocks = start + tl.arange(0, CHUNK)
        # Buckets past num_experts are empty and end where the last run ends, so a block
        # after every run counts them too and lands past num_experts: PAST_END.
        bucket = tl.sum((padded_end[None, :] <= blocks[:, None] * BLOCK_M).to(tl.int32), axis=1)
        expert = tl.where(bucket < num_experts, bucket,
                          tl.where(bucket == num_experts, NOT_OWNED, PAST_END))
        tl.store(block_experts_ptr + blocks, expert, mask=blocks < max_blocks)

    placed = tl.zeros((BLOCK_E,), dtype=tl.int32)
    for start in range(0, num_pairs, CHUNK):
        offs = start + tl.arange(0, CHUNK)
        pair_bucket = _pair_buckets(ids_ptr, offs, num_pairs, expert_offset, num_experts)
        one_hot = (pair_bucket[:, None] == buckets[None, :]).to(tl.int32)
        slot = padded_start + placed
        # A pair's place is its bucket's next free slot plus the same-bucket pairs before
        # it in this chunk: stable, so the order does not depend on the hardware.
        dest = tl.sum(one_hot * (slot[None, :] + tl.cumsum(one_hot, axis=0) - one_hot), axis=1)
        tl.store(sorted_pairs_ptr + dest, offs, mask=offs < num_pairs)
        placed += tl.sum(one_hot, axis=0)


def moe_align(topk_ids: torch.Tensor, block_m: int, expert_offset: int,
              num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort the (token, k) pairs by local expert, padding each expert's run to block_m.

    Returns sorted_pairs (pair index token * topk + k, or num_pairs for padding) and
    block_experts (per row block: its local expert, NOT_OWNED for pairs of experts
    outside [expert_offset, expert_offset + num_experts), PAST_END after the last run).
    Both are sized for the worst case, so nothing waits on the device to know the count;
    one program does it all, since a launch costs more than the work at decode sizes.
    """
    num_pairs = topk_ids.numel()
    max_blocks = triton.cdiv(num_pairs, block_m) + num_experts + 1
    sorted_pairs = torch.full((max_blocks * block_m,), num_pairs, dtype=torch.int32,
                              device=topk_ids.device)
    block_experts = torch.empty(max_blocks, dtype=torch.int32, device=topk_ids.device)
    block_e = triton.next_power_of_2(num_experts + 1)
    _moe_align_kernel[(1,)](
        topk_ids.contiguous(), sorted_pairs, block_experts, num_pairs, expert_offset,
        num_experts, max_blocks, BLOCK_M=block_m, BLOCK_E=block_e,
        CHUNK=max(16, 4096 // block_e), num_warps=8)
    return sorted_pairs, block_experts


def _block_m(num_pairs: int, num_experts: int) -> int:
    """Rows per block: about the mean run length, so sparse experts waste little padding."""
    return min(64, max(16, triton.next_power_of_2(triton.cdiv(num_pairs, num_experts))))


def _check(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
           topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> None:
    if x.dim() != 2 or w13.dim() != 3 or w13.shape[2] != x.shape[1] or w13.shape[1] % 2:
        raise ValueError(f"x must be [T, K] and w13 [E, 2I, K]; got x {tuple(x.shape)} and "
                         f"w13 {tuple(w13.shape)}")
    experts, inter = w13.shape[0], w13.shape[1] // 2
    if w2.shape != (experts, x.shape[1], inter):
        raise ValueError(f"w2 must be [E, K, I] = [{experts}, {x.shape[1]}, {inter}]; got "
                         f"{tuple(w2.shape)}")
    if topk_ids.dim() != 2 or topk_ids.shape[0] != x.shape[0]:
        raise ValueError(f"topk_ids must be [T, topk] with T = {x.shape[0]}; got "
                         f"{tuple(topk_ids.shape)}")
    if topk_weights.shape != topk_ids.shape:
        raise ValueError(f"topk_weights must have the shape of topk_ids "
                         f"{tuple(topk_ids.shape)}; got {tuple(topk_weights.shape)}")


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
              topk_weights: torch.Tensor, topk_ids: torch.Tensor, expert_offset: int = 0,
              *, out: torch.Tensor | None = None) -> torch.Tensor:
    """sum_k w_k * down(SiLU(gate) * up) over this rank's experts, as reference.fused_moe."""
    _check(x, w13, w2, topk_weights, topk_ids)
    tokens, hidden = x.shape
    experts, inter = w13.shape[0], w13.shape[1] // 2
    topk = topk_ids.shape[1]
    num_pairs = tokens * topk
    out = output_like(x, out)
    if num_pairs == 0:   # no tokens, or no expert chosen per token: nothing to add up
        return out.zero_()
    block_m = _block_m(num_pairs, experts)
    sorted_pairs, block_experts = moe_align(topk_ids, block_m, expert_offset, experts)
    max_blocks = block_experts.shape[0]
    if interpreting():
        # The interpreter runs every program, those that return at once too (up to
        # num_experts + 1 row blocks past the last run): launch only the blocks in use.
        max_blocks = int((block_experts != PAST_END.value).sum())
    precision = dot_precision(x.dtype)
    weights = topk_weights.reshape(-1).contiguous()
    bucket = shape_bucket(num_pairs)

    act = torch.empty(num_pairs, inter, dtype=x.dtype, device=x.device)
    _moe_gemm_kernel[lambda meta: (max_blocks, triton.cdiv(inter, meta["BLOCK_N"]))](
        x, w13, act, sorted_pairs, block_experts, weights, num_pairs, inter, hidden, bucket,
        topk, *x.stride(), *w13.stride(), *act.stride(),
        GATE_UP=True, PRECISION=precision, BLOCK_M=block_m)

    partial = torch.empty(num_pairs, hidden, dtype=torch.float32, device=x.device)
    _moe_gemm_kernel[lambda meta: (max_blocks, triton.cdiv(hidden, meta["BLOCK_N"]))](
        act, w2, partial, sorted_pairs, block_experts, weights, num_pairs, hidden, inter,
        bucket, 1, *act.stride(), *w2.stride(), *partial.stride(),
        GATE_UP=False, PRECISION=precision, BLOCK_M=block_m)
    return out.copy_(partial.view(tokens, topk, hidden).sum(dim=1))

"""Plain torch references, one per kernel, with the kernels' exact signatures.

They are the CPU path of every op and the ground truth of the kernel tests. Shapes are
token-major: T tokens, Hq query heads, Hk KV heads, D head size. The KV cache is
[num_blocks, block_size, Hk, D]; a slot is block_id * block_size + offset.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           residual: torch.Tensor | None = None) -> torch.Tensor:
    """x[M, K] @ weight[N, K]^T (+ bias[N]) (+ residual[M, N])."""
    out = F.linear(x, weight, bias)
    if residual is not None:
        out = out + residual
    return out


def linear_silu_mul(x: torch.Tensor, weight: torch.Tensor,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
    """SiLU(gate) * up of a merged gate_up weight[2N, K] (rows: gate, then up) -> [M, N]."""
    gate, up = F.linear(x, weight, bias).chunk(2, dim=-1)
    return F.silu(gate) * up


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None
             ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm over the last dim, in fp32. With `residual`: returns (norm(x + r), x + r)."""
    if residual is not None:
        x = x + residual
        summed = x
    xf = x.float()
    out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    out = (out * weight.float()).to(x.dtype)
    return out if residual is None else (out, summed)


def linear_rms_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    residual: torch.Tensor, norm_weight: torch.Tensor, eps: float
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMSNorm(s), s) for s = x @ weight^T (+ bias) + residual."""
    summed = linear(x, weight, bias, residual)
    return rms_norm(summed, norm_weight, eps), summed


def rotary_embedding(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                     cos_sin_cache: torch.Tensor, is_neox: bool
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q[T, Hq, D] and k[T, Hk, D] by position; cos_sin_cache[P, R] is [cos | sin].

    Only the first R dims of each head rotate. Neox style pairs (i, i + R/2); GPT-J style
    pairs (2i, 2i + 1).
    """
    rot = cos_sin_cache.shape[-1]
    cos, sin = cos_sin_cache[positions.long()].float().chunk(2, dim=-1)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)

    def rotate(t: torch.Tensor) -> torch.Tensor:
        head, tail = t[..., :rot].float(), t[..., rot:]
        if is_neox:
            a, b = head.chunk(2, dim=-1)
            rotated = torch.cat((a * cos - b * sin, b * cos + a * sin), dim=-1)
        else:
            a, b = head[..., 0::2], head[..., 1::2]
            rotated = torch.stack((a * cos - b * sin, b * cos + a * sin), dim=-1).flatten(-2)
        return torch.cat((rotated.to(t.dtype), tail), dim=-1)

    return rotate(q), rotate(k)


def write_kv_cache(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                   v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Store k, v [T, Hk, D] at their slots; a slot of -1 (padding) is skipped."""
    valid = slot_mapping >= 0
    if not bool(valid.all()):
        k, v, slot_mapping = k[valid], v[valid], slot_mapping[valid]
    slots = slot_mapping.long()
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slots, k.to(k_cache.dtype))
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slots, v.to(v_cache.dtype))


def rotary_and_write_kv_cache(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                              v: torch.Tensor, cos_sin_cache: torch.Tensor, is_neox: bool,
                              k_cache: torch.Tensor, v_cache: torch.Tensor,
                              slot_mapping: torch.Tensor) -> torch.Tensor:
    """rotary_embedding, then write_kv_cache of the rotated k and of v; returns rotated q."""
    q, k = rotary_embedding(positions, q, k, cos_sin_cache, is_neox)
    write_kv_cache(k, v, k_cache, v_cache, slot_mapping)
    return q


def split_qkv(qkv: torch.Tensor, num_heads: int, num_kv_heads: int, head_size: int
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Views q [T, Hq, D], k and v [T, Hk, D] of a QKV projection's rows [T, (Hq+2Hk) D]."""
    tokens = qkv.shape[0]
    q, k, v = qkv.split([num_heads * head_size, num_kv_heads * head_size,
                         num_kv_heads * head_size], dim=-1)
    return (q.view(tokens, num_heads, head_size), k.view(tokens, num_kv_heads, head_size),
            v.view(tokens, num_kv_heads, head_size))


def qkv_rotary_and_write_kv_cache(x: torch.Tensor, weight: torch.Tensor,
                                  bias: torch.Tensor | None, positions: torch.Tensor,
                                  cos_sin_cache: torch.Tensor, is_neox: bool,
                                  k_cache: torch.Tensor, v_cache: torch.Tensor,
                                  slot_mapping: torch.Tensor, num_heads: int) -> torch.Tensor:
    """linear of x by the fused QKV weight, split into heads (KV heads and head size as the
    cache's), then rotary_and_write_kv_cache; returns the rotated q [T, Hq, D]."""
    q, k, v = split_qkv(linear(x, weight, bias), num_heads, *k_cache.shape[2:])
    return rotary_and_write_kv_cache(positions, q, k, v, cos_sin_cache, is_neox, k_cache,
                                     v_cache, slot_mapping)


def _context(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """One sequence's first `length` cached rows as [Hk, length, D] in fp32.

    Only those rows are read: slots past a sequence's end may hold anything, even NaN.
    """
    n_blocks = -(-length // cache.shape[1])
    rows = cache.index_select(0, block_table[:n_blocks]).flatten(0, 1)[:length]
    return rows.transpose(0, 1).float()


def sequence_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                       block_table: torch.Tensor, length: int, scale: float) -> torch.Tensor:
    """The last q.shape[0] tokens of a length-long sequence, causally over its cache."""
    q_len = q.shape[0]
    k = _context(k_cache, block_table, length)
    v = _context(v_cache, block_table, length)
    mask = None
    if q_len > 1:
        q_pos = torch.arange(length - q_len, length, device=q.device)
        mask = torch.arange(length, device=q.device)[None, :] <= q_pos[:, None]
    # A batch of one: on the CPU torch takes its flash kernel for 4-D inputs only, and 3-D
    # ones fall to the math path, which builds the whole score matrix (about 2x slower).
    out = F.scaled_dot_product_attention(q.float().transpose(0, 1)[None], k[None], v[None],
                                         attn_mask=mask, scale=scale,
                                         enable_gqa=q.shape[1] != k.shape[0])
    return out[0].transpose(0, 1).to(q.dtype)


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor,
                           scale: float) -> torch.Tensor:
    """One query token per sequence: q[B, Hq, D] over each sequence's seq_lens[b] cached keys.

    All sequences go through one padded, masked SDPA call (decode batches are wide and
    their contexts short, so one call beats a call per sequence). The padding reads slots
    past each sequence's end (a freed request's leftovers, other sequences' blocks through
    the table's unused entries), which may hold anything, NaN included: they are zeroed
    before the call, since a masked score or a zero weight still keeps a NaN. A sequence of
    length 0 attends to nothing and gets zeros.
    """
    seq_lens = seq_lens.long()
    max_len = max(int(seq_lens.max()), 1) if seq_lens.numel() else 1
    table = block_tables[:, :-(-max_len // k_cache.shape[1])].long()
    valid = torch.arange(max_len, device=q.device)[None, :] < seq_lens[:, None]   # [B, L]
    mask = valid[:, None, None]

    def context(cache: torch.Tensor) -> torch.Tensor:   # [B, Hk, L, D]
        rows = cache[table].flatten(1, 2)[:, :max_len].float()
        return rows.where(valid[:, :, None, None], 0.0).transpose(1, 2)

    k, v = context(k_cache), context(v_cache)
    out = F.scaled_dot_product_attention(q.float()[:, :, None], k, v, attn_mask=mask,
                                         scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    return torch.where((seq_lens > 0)[:, None, None], out[:, :, 0], 0.0).to(q.dtype)


def paged_prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            block_tables: torch.Tensor, query_start_loc: torch.Tensor,
                            seq_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention for varlen query chunks whose K/V are already in the cache.

    Sequence b's queries are q[query_start_loc[b]:query_start_loc[b+1]], the last q_len
    of its seq_lens[b] tokens; each attends to the cached prefix and to new tokens up to
    itself, as chunked prefill needs. Rows of q past query_start_loc[-1] are padding: what
    the result holds there is unspecified (zeros here; the Triton kernel leaves them).
    """
    out = torch.zeros_like(q)
    starts = query_start_loc.tolist()
    for b, length in enumerate(seq_lens.tolist()):
        start, end = starts[b], starts[b + 1]
        if end > start:
            out[start:end] = sequence_attention(q[start:end], k_cache, v_cache,
                                                block_tables[b], length, scale)
    return out


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
              topk_weights: torch.Tensor, topk_ids: torch.Tensor,
              expert_offset: int = 0) -> torch.Tensor:
    """Mixture of experts over this rank's experts: sum_k w_k * down(SiLU(gate) * up).

    w13[E, 2I, K] holds each local expert's gate and up rows, w2[E, K, I] its down
    projection; local expert e is global expert expert_offset + e. Token choices of
    experts outside this rank's range contribute nothing (expert parallelism sums the
    ranks' partial outputs).
    """
    out = torch.zeros(x.shape[0], w2.shape[1], dtype=torch.float32, device=x.device)
    local_ids = topk_ids.long() - expert_offset
    for e in range(w13.shape[0]):
        token_idx, slot = (local_ids == e).nonzero(as_tuple=True)
        if token_idx.numel() == 0:
            continue
        hidden = linear_silu_mul(x[token_idx], w13[e])
        y = F.linear(hidden, w2[e]).float()
        out.index_add_(0, token_idx, y * topk_weights[token_idx, slot].float()[:, None])
    return out.to(x.dtype)

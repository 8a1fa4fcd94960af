"""Ulysses sequence parallelism: a step's tokens split over the SP group.

Every SP rank holds the same weights (its TP slice) and runs the embedding, norms and MLP
on its own contiguous share of the step's tokens, so those costs and the activations
shrink by the SP size. Attention needs whole sequences, so around it an all-to-all trades
tokens for heads: each rank then holds every token of 1/SP of its TP heads, attends with
the KV cache of those heads only (the cache is split by heads exactly as under TP), and a
second all-to-all trades back.

A step whose token count SP does not divide is padded at its end; padding tokens write
no KV, take part in no sequence and are dropped before the logits. So a decode step with
fewer tokens than SP ranks runs too (some ranks then hold only padding): that is the
choice made here, rather than running such steps head-split only.

KV heads follow the TP rule: SP divides this rank's KV heads, or is a multiple of them,
in which case the SP ranks sharing a KV head each receive all of its tokens (an all-gather
in place of the all-to-all) and keep the head their query heads read.
"""

from __future__ import annotations

import torch

from shardline.distributed.parallel_state import get_sp_group


def padded_len(num_tokens: int, sp: int) -> int:
    """The step's token count rounded up to a multiple of the SP size."""
    return -(-num_tokens // sp) * sp


def local_num_tokens(num_tokens: int) -> int:
    """How many of a step's `num_tokens` tokens (padding included) this SP rank holds."""
    sp = get_sp_group().size
    return padded_len(num_tokens, sp) // sp


def split_tokens(x: torch.Tensor) -> torch.Tensor:
    """This rank's contiguous share of the step's tokens (dim 0), padded with zeros."""
    group = get_sp_group()
    if group.size == 1:
        return x
    share = local_num_tokens(x.shape[0])
    start = group.rank * share
    local = x[start:start + share]
    if local.shape[0] == share:
        return local
    pad = x.new_zeros((share - local.shape[0], *x.shape[1:]))
    return torch.cat([local, pad])


def gather_tokens(x: torch.Tensor, num_tokens: int) -> torch.Tensor | None:
    """Every rank's share back in token order, on SP rank 0 only (which alone goes on to
    the logits); None on the others."""
    group = get_sp_group()
    if group.size == 1:
        return x
    full = group.gather(x, dst=0, dim=0)
    return None if full is None else full[:num_tokens]


def _exchange(x: torch.Tensor) -> torch.Tensor:
    """all-to-all of equal parts along dim 0 (no split exchange needed)."""
    group = get_sp_group()
    splits = [x.shape[0] // group.size] * group.size
    return group.all_to_all(x, splits, splits)


def tokens_to_heads(x: torch.Tensor) -> torch.Tensor:
    """[T/SP, H, D] (this rank's tokens, all heads) -> [T, H/SP, D] (all tokens, this rank's
    contiguous share of the heads)."""
    sp = get_sp_group().size
    tokens, heads, dim = x.shape
    parts = x.reshape(tokens, sp, heads // sp, dim).transpose(0, 1)
    return _exchange(parts.contiguous()).reshape(sp * tokens, heads // sp, dim)


def heads_to_tokens(x: torch.Tensor) -> torch.Tensor:
    """The inverse of tokens_to_heads: [T, H/SP, D] -> [T/SP, H, D]."""
    sp = get_sp_group().size
    tokens, heads, dim = x.shape
    received = _exchange(x.reshape(sp, tokens // sp, heads, dim))
    return received.transpose(0, 1).reshape(tokens // sp, sp * heads, dim)


def kv_tokens_to_heads(x: torch.Tensor) -> torch.Tensor:
    """tokens_to_heads for K or V, with fewer KV heads than SP ranks allowed: then every
    rank gathers all tokens of all KV heads and keeps the one its query heads share."""
    group = get_sp_group()
    heads = x.shape[1]
    if heads % group.size == 0:
        return tokens_to_heads(x)
    everything = group.all_gather(x, dim=0)
    head = group.rank * heads // group.size
    return everything[:, head:head + 1]


def ulysses_attention(attn: torch.nn.Module, q: torch.Tensor, k: torch.Tensor,
                      v: torch.Tensor, meta) -> torch.Tensor:
    """`attn` over the whole step for this rank's heads, from and back to this rank's
    tokens: q [T/SP, Hq, D], k and v [T/SP, Hk, D] -> [T/SP, Hq * D]."""
    num_tokens = meta.slot_mapping.shape[0]
    q, k, v = tokens_to_heads(q), kv_tokens_to_heads(k), kv_tokens_to_heads(v)
    out = attn(q[:num_tokens], k[:num_tokens], v[:num_tokens], meta)
    padded = out.new_zeros((q.shape[0], q.shape[1], q.shape[2]))
    padded[:num_tokens] = out.view(num_tokens, q.shape[1], q.shape[2])
    local = heads_to_tokens(padded)
    return local.reshape(local.shape[0], -1)

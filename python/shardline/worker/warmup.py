"""Kernel warm-up at startup: one throwaway forward per shape bucket.

A Triton kernel compiles (and, under SHARDLINE_AUTOTUNE=1 where the GPU's tuned table
lacks its key, autotunes) the first time it meets a new shape bucket, which takes from a
fraction of a second to seconds. Left to serving, that stall lands on whichever request
first brings a new prompt size. Running every bucket once at startup moves it there. A first pass only compiles,
every kernel at once on the CPU cores (see shardline.kernels._tuned.compile_ahead); the
second runs. Compiled kernels and timings are cached on disk, so a restart reloads them.

The throwaway batches write no KV (every slot is -1), so the cache is left as it was.
"""

from __future__ import annotations

import logging
import time

import torch
from torch import nn

from shardline.kernels._tuned import SMALLEST_BUCKET
from shardline.kernels._tuned import compile_ahead
from shardline.layers.attention import AttentionMetadata
from shardline.layers.sequence_parallel import local_num_tokens
from shardline.models.llama import IntermediateTensors

logger = logging.getLogger(__name__)

TUNING_CONTEXT = 1024
"""Tokens each sequence holds in the throwaway decodes (the warm-up's and the graph
capture's): where SHARDLINE_AUTOTUNE=1 times decode attention's configs on them, it times
them on a context of this length, not on a near-empty one."""
UNSPLIT_CONTEXT = 256
"""The longest context decode attention reads in one split (kernels.attention_decode's
choose_splits splits none of 256 tokens or fewer)."""


def token_buckets(limit: int) -> list[int]:
    """Token counts that reach every kernel shape bucket up to `limit`, and `limit`'s own.

    Sizes under SMALLEST_BUCKET share one bucket, so below it only 1 (a decode) and one
    count under it remain: triton compiles a kernel separately for a size of 1, a multiple
    of 16 and any other size, so each of those is met once.
    """
    counts = [n for n in (1, SMALLEST_BUCKET // 2) if n < limit]
    n = SMALLEST_BUCKET
    while n < limit:
        counts.append(n)
        n *= 2
    return counts + [limit]


def dummy_prefill(num_tokens: int, block_size: int, max_position: int, vocab_size: int,
                  device: torch.device, context: int | None = None, blocks: int | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
    """One sequence whose last `num_tokens` random tokens of `context` (all of them by
    default) are new: a prefill, or with one token a decode, that writes no KV and reads
    only block 0 (whatever it holds: the output is thrown away), through a block table of
    `blocks` entries (as many as the context fills by default). Positions wrap at
    `max_position`, which the token budget may exceed."""
    context = num_tokens if context is None else context
    input_ids = torch.randint(vocab_size, (num_tokens,), device=device)
    positions = torch.arange(context - num_tokens, context, device=device) % max_position
    blocks = -(-context // block_size) if blocks is None else blocks
    meta = AttentionMetadata(
        slot_mapping=torch.full((num_tokens,), -1, dtype=torch.int64, device=device),
        query_start_loc=torch.tensor([0, num_tokens], dtype=torch.int32, device=device),
        seq_lens=torch.tensor([context], dtype=torch.int32, device=device),
        block_tables=torch.zeros(1, blocks, dtype=torch.int32, device=device),
        decode_only=num_tokens == 1)
    return input_ids, positions, meta


@torch.inference_mode()
def warm_up_prefill(model: nn.Module, max_num_batched_tokens: int, max_num_seqs: int,
                    block_size: int, max_position: int, vocab_size: int,
                    device: torch.device) -> int:
    """Run a prefill of every token bucket up to max_num_batched_tokens, and the logits of
    every sampled-row bucket up to max_num_seqs; returns the most logits rows it ran."""
    started = time.perf_counter()
    buckets = token_buckets(max_num_batched_tokens)
    # The one-token bucket is two decodes: one that attention reads in a single split, and
    # one through a block table as wide as the longest context, which it splits over
    # programs and merges (kernels a short context never reaches).
    decodes = [dummy_prefill(1, block_size, max_position, vocab_size, device,
                             context=min(max_position, UNSPLIT_CONTEXT)),
               dummy_prefill(1, block_size, max_position, vocab_size, device,
                             context=min(max_position, TUNING_CONTEXT),
                             blocks=-(-max_position // block_size))]
    batches = decodes + [dummy_prefill(n, block_size, max_position, vocab_size, device)
                         for n in buckets if n > 1]
    with compile_ahead(device) as ahead:
        if ahead:
            _run_buckets(model, batches, max_num_seqs)
    if ahead:
        logger.info("kernel warm-up: compiled in %.1f s", time.perf_counter() - started)
    _run_buckets(model, batches, max_num_seqs)
    logger.info("kernel warm-up done in %.1f s", time.perf_counter() - started)
    return min(max_num_seqs, buckets[-1])


def stage_input(model: nn.Module, num_tokens: int) -> IntermediateTensors | None:
    """Random activations in place of the previous pipeline stage's for a stage after the
    first (None for the first): a throwaway forward's output is never read, so a stage
    warms up alone, without its neighbours."""
    if model.is_first_stage:
        return None
    weight = next(model.parameters())
    shape = (local_num_tokens(num_tokens), model.config["hidden_size"])
    return IntermediateTensors(*(torch.randn(shape, dtype=weight.dtype, device=weight.device)
                                 for _ in range(2)))


def _run_buckets(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor,
                                                        AttentionMetadata]],
                 max_num_seqs: int) -> None:
    """Every batch through this rank's stage, then the logits where this rank computes
    them: the last stage's, on SP rank 0 (the one its gather leaves the hidden states)."""
    for input_ids, positions, meta in batches:
        hidden = model(input_ids, positions, meta, stage_input(model, input_ids.shape[0]))
    if not model.is_last_stage or hidden is None:
        return
    for rows in token_buckets(min(max_num_seqs, hidden.shape[0])):
        model.compute_logits(hidden[:rows])

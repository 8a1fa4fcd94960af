"""Decode steps replayed from CUDA graphs, one graph per padded batch size.

A decode step of a small model on a GPU can be bound by the host: its few hundred kernel
launches may cost as much as the kernels themselves. Capturing the model's decode forward
once per batch-size bucket and replaying it turns those launches into one.

A graph reads its inputs from fixed addresses, so each step's inputs are copied into
static buffers sized for the largest bucket. A batch smaller than its bucket is padded
with rows that write no KV (slot -1) and attend to nothing (length 0); their outputs are
dropped.

Capturing runs the forward a few times first, and Triton autotunes each kernel on that
first run where asked to (SHARDLINE_AUTOTUNE=1, a shape the tuned table lacks). So while
a graph is recorded, its rows stand in for real sequences (distinct tokens, a context of
realistic length, read from block 0) rather than empty padding, on which every config
would look equally fast. They still write no KV.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Protocol

import torch
from torch import nn

from shardline.layers.attention import AttentionMetadata
from shardline.worker.input_batch import StepInputs

logger = logging.getLogger(__name__)

Replay = Callable[[], None]


class GraphRecorder(Protocol):
    """Turns a forward function into a replayable step whose output tensor stays put."""

    def record(self, forward: Callable[[], torch.Tensor]) -> tuple[Replay, torch.Tensor]:
        """Return (replay, output): each replay() recomputes `output` in place from the
        current contents of the buffers `forward` reads."""


class CudaGraphRecorder:
    """Records with torch.cuda.CUDAGraph; all graphs share one memory pool, since only one
    replays at a time."""

    def __init__(self, warmup_runs: int = 2) -> None:
        self.pool = torch.cuda.graph_pool_handle()
        self.warmup_runs = warmup_runs

    def record(self, forward: Callable[[], torch.Tensor]) -> tuple[Replay, torch.Tensor]:
        # Warm-up runs on a side stream compile (and may autotune) every Triton kernel of
        # this shape, since neither (autotuning synchronizes) can happen inside a capture.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmup_runs):
                forward()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            output = forward()
        return graph.replay, output


def graph_batch_sizes(max_num_seqs: int, largest: int = 256) -> list[int]:
    """The buckets: 1, 2, 4, 8, then every multiple of 16, up to max_num_seqs (capped)."""
    top = min(max_num_seqs, largest)
    sizes = [b for b in (1, 2, 4, 8) if b < top]
    sizes += list(range(16, top, 16))
    return sizes + [top]


class DecodeGraphRunner:
    """The model's decode forward (up to the final norm) for batches of up to
    max(batch_sizes) sequences, each padded to the next captured size."""

    def __init__(self, model: nn.Module, batch_sizes: list[int], max_blocks_per_seq: int,
                 block_size: int, device: torch.device) -> None:
        if not batch_sizes or min(batch_sizes) < 1:
            raise ValueError(f"batch_sizes must be non-empty and >= 1; got {batch_sizes}")
        if max_blocks_per_seq < 1:
            raise ValueError(f"max_blocks_per_seq must be >= 1; got {max_blocks_per_seq}")
        self.model = model
        self.batch_sizes = sorted(set(batch_sizes))
        self.max_blocks_per_seq = max_blocks_per_seq
        self.block_size = block_size
        largest = self.batch_sizes[-1]
        self.input_ids = torch.zeros(largest, dtype=torch.long, device=device)
        self.positions = torch.zeros(largest, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((largest,), -1, dtype=torch.int64, device=device)
        self.seq_lens = torch.zeros(largest, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(largest, max_blocks_per_seq, dtype=torch.int32,
                                        device=device)
        self.query_start_loc = torch.arange(largest + 1, dtype=torch.int32, device=device)
        self.graphs: dict[int, tuple[Replay, torch.Tensor]] = {}

    def capture(self, recorder: GraphRecorder, tuning_context: int, vocab_size: int) -> None:
        """Record one graph per batch size, largest first (later, smaller captures reuse
        the pool memory the first one reserved), with its rows standing in for sequences
        of `tuning_context` tokens. The KV cache is left untouched."""
        longest = self.max_blocks_per_seq * self.block_size
        if not 1 <= tuning_context <= longest:
            raise ValueError(f"tuning_context={tuning_context} must be in [1, {longest}], "
                             "the tokens a block table row can hold")
        started = time.perf_counter()
        for size in reversed(self.batch_sizes):
            self.slot_mapping.fill_(-1)
            self.seq_lens[:size].fill_(tuning_context)
            self.positions[:size].fill_(tuning_context - 1)
            torch.remainder(torch.arange(size, device=self.input_ids.device), vocab_size,
                            out=self.input_ids[:size])
            self.graphs[size] = recorder.record(self._forward_fn(size))
        self._pad_from(0)
        logger.info("decode graphs: %d batch sizes captured in %.1f s", len(self.graphs),
                    time.perf_counter() - started)

    def supports(self, inputs: StepInputs) -> bool:
        """True for a decode-only step that fits a captured graph."""
        return (bool(self.graphs) and inputs.meta.decode_only
                and inputs.input_ids.shape[0] <= self.batch_sizes[-1]
                and inputs.meta.block_tables.shape[1] <= self.max_blocks_per_seq)

    def run(self, inputs: StepInputs) -> torch.Tensor:
        """Hidden states [B, hidden] of a decode step that `supports` accepted."""
        batch = inputs.input_ids.shape[0]
        size = next(s for s in self.batch_sizes if s >= batch)
        width = inputs.meta.block_tables.shape[1]
        self.input_ids[:batch].copy_(inputs.input_ids)
        self.positions[:batch].copy_(inputs.positions)
        self.slot_mapping[:batch].copy_(inputs.meta.slot_mapping)
        self.seq_lens[:batch].copy_(inputs.meta.seq_lens)
        self.block_tables[:batch, :width].copy_(inputs.meta.block_tables)
        self._pad_from(batch, size)
        replay, output = self.graphs[size]
        replay()
        return output[:batch]

    def _pad_from(self, start: int, end: int | None = None) -> None:
        """Rows [start, end) become padding: no KV write, nothing to attend to."""
        self.slot_mapping[start:end].fill_(-1)
        self.seq_lens[start:end].fill_(0)
        self.input_ids[start:end].fill_(0)
        self.positions[start:end].fill_(0)

    def _forward_fn(self, size: int) -> Callable[[], torch.Tensor]:
        meta = AttentionMetadata(slot_mapping=self.slot_mapping[:size],
                                 query_start_loc=self.query_start_loc[:size + 1],
                                 seq_lens=self.seq_lens[:size],
                                 block_tables=self.block_tables[:size], decode_only=True)
        input_ids, positions = self.input_ids[:size], self.positions[:size]
        return lambda: self.model(input_ids, positions, meta)

"""The worker's view of its requests, and the flat token batch of one step.

A step's scheduled tokens, from every request, are laid out back to back: token ids,
positions and cache slots per token; query spans, lengths after the step and block
tables per request. Requests that reach a sampling point this step are marked, so the
model computes logits only at their last token.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from shardline.engine.batch import CachedRequestData, NewRequestData
from shardline.engine.sampling_params import SamplingParams
from shardline.layers.attention import AttentionMetadata


@dataclass
class RequestState:
    """Everything a worker keeps about one request between steps."""

    req_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    sampling_params: SamplingParams
    block_ids: list[int]
    num_computed_tokens: int

    @classmethod
    def from_new(cls, data: NewRequestData) -> "RequestState":
        return cls(data.req_id, list(data.prompt_token_ids), list(data.output_token_ids),
                   SamplingParams.from_dict(data.sampling_params), list(data.block_ids),
                   data.num_computed_tokens)

    def update(self, data: CachedRequestData) -> None:
        self.output_token_ids.extend(data.new_token_ids)
        self.block_ids.extend(data.new_block_ids)
        self.num_computed_tokens = data.num_computed_tokens

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    def token_slice(self, start: int, end: int) -> list[int]:
        """Token ids [start, end) of prompt + outputs, copying only that range."""
        prompt_len = len(self.prompt_token_ids)
        head = self.prompt_token_ids[start:end] if start < prompt_len else []
        return head + self.output_token_ids[max(start - prompt_len, 0):max(end - prompt_len, 0)]


@dataclass
class StepInputs:
    """Model inputs of one step and which rows of the output to sample from."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: AttentionMetadata
    req_ids: list[str]                          # scheduled requests, in batch order
    sample_req_ids: list[str] = field(default_factory=list)
    logits_indices: torch.Tensor | None = None  # token rows of sample_req_ids


def build_step_inputs(requests: list[RequestState], num_scheduled: list[int],
                      block_size: int, device: torch.device) -> StepInputs:
    """Lay out the scheduled tokens of `requests` (num_scheduled[i] tokens each, starting
    at its num_computed_tokens) as one flat batch."""
    token_ids: list[int] = []
    starts, q_lens, sample_rows, sample_ids = [], [], [], []
    max_blocks = max(len(r.block_ids) for r in requests)
    block_tables = np.zeros((len(requests), max_blocks), dtype=np.int32)
    for i, (req, n) in enumerate(zip(requests, num_scheduled)):
        start = req.num_computed_tokens
        if start + n > req.num_tokens:
            raise ValueError(f"request {req.req_id!r}: num_computed_tokens={start} + "
                             f"num_scheduled_tokens={n} exceeds its {req.num_tokens} tokens")
        if -(-(start + n) // block_size) > len(req.block_ids):
            raise ValueError(f"request {req.req_id!r}: {start + n} tokens need more than its "
                             f"{len(req.block_ids)} blocks of {block_size}")
        token_ids.extend(req.token_slice(start, start + n))
        starts.append(start)
        q_lens.append(n)
        block_tables[i, :len(req.block_ids)] = req.block_ids
        if start + n == req.num_tokens:
            sample_rows.append(len(token_ids) - 1)
            sample_ids.append(req.req_id)
    q_lens_np = np.asarray(q_lens, dtype=np.int64)
    query_start_loc = np.concatenate(([0], np.cumsum(q_lens_np)))
    seq_lens = np.asarray(starts, dtype=np.int64) + q_lens_np
    positions = (np.arange(query_start_loc[-1]) - np.repeat(query_start_loc[:-1], q_lens_np)
                 + np.repeat(starts, q_lens_np))
    row_of_token = np.repeat(np.arange(len(requests)), q_lens_np)
    blocks = block_tables[row_of_token, positions // block_size].astype(np.int64)
    slot_mapping = blocks * block_size + positions % block_size

    def as_tensor(array: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array)).to(device, dtype)

    meta = AttentionMetadata(
        slot_mapping=as_tensor(slot_mapping, torch.int64),
        query_start_loc=as_tensor(query_start_loc, torch.int32),
        seq_lens=as_tensor(seq_lens, torch.int32),
        block_tables=as_tensor(block_tables, torch.int32),
        decode_only=bool((q_lens_np == 1).all()),
    )
    return StepInputs(
        input_ids=torch.tensor(token_ids, dtype=torch.long, device=device),
        positions=as_tensor(positions, torch.int64),
        meta=meta,
        req_ids=[r.req_id for r in requests],
        sample_req_ids=sample_ids,
        logits_indices=torch.tensor(sample_rows, dtype=torch.long, device=device),
    )

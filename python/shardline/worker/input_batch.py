"""The worker's view of its requests, and the flat token batch of one step.

A step's scheduled tokens, from every request, are laid out back to back: token ids,
positions and cache slots per token; query spans, lengths after the step and block
tables per request. Requests that reach a sampling point this step are marked, so the
model computes logits only at their last token (and, for requests that ask for prompt
logprobs, at their prompt tokens: see worker.prompt_logprobs).

Under async scheduling a request's last token may be one the worker sampled in the step
before and the engine has not sent yet (its step went ahead): that token's row is filled
on the device from the earlier step's tokens, which the host need not wait for.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import InitVar, dataclass, field

import numpy as np
import torch

from shardline.device_copy import to_device
from shardline.step import NewRequestData
from shardline.sampling_params import SamplingParams
from shardline.layers.attention import AttentionMetadata
from shardline.layers.token_sets import BlockedTokens, TokenBias


_NO_STOPS = BlockedTokens(())


@dataclass
class RequestState:
    """Everything a worker keeps about one request between steps.

    Its per-request sampling arrays are made here, once, when the worker is given the
    request (again after a preemption, which re-adds it), and handed to the sampler every
    step: they may number a vocabulary, and the params never change in the worker.
    `eos_token_ids` are the model's, which the request's min_tokens masks."""

    req_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    sampling_params: SamplingParams
    block_ids: list[int]
    num_computed_tokens: int
    eos_token_ids: InitVar[Sequence[int]] = ()
    # The tokens masked while it is short of min_tokens, those that would end it:
    # stop_token_ids and eos unless ignored, each once (none when min_tokens is 0).
    stop_ids: BlockedTokens = field(init=False, repr=False)
    # Its logit_bias and allowed_token_ids as arrays (None when it has neither).
    token_bias: TokenBias | None = field(init=False, repr=False)

    def __post_init__(self, eos_token_ids: Sequence[int]) -> None:
        params = self.sampling_params
        self.token_bias = TokenBias.of(params)
        self.stop_ids = _NO_STOPS
        if params.min_tokens:
            eos = () if params.ignore_eos else eos_token_ids
            self.stop_ids = BlockedTokens([*params.stop_token_ids, *eos])

    @classmethod
    def from_new(cls, data: NewRequestData, eos_token_ids: Sequence[int]) -> "RequestState":
        """The state of a request the scheduler sends for the first time, or resumes after
        preemption; `eos_token_ids` as in the class docstring."""
        return cls(data.req_id, list(data.prompt_token_ids), list(data.output_token_ids),
                   SamplingParams.from_dict(data.sampling_params), list(data.block_ids),
                   data.num_computed_tokens, eos_token_ids)

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
    ahead_req_ids: list[str] = field(default_factory=list)  # last token from the step before
    ahead_rows: torch.Tensor | None = None      # their last token's row in input_ids
    ahead_sources: torch.Tensor | None = None   # its row in the previous step's tokens
    # Requests that want prompt logprobs and compute prompt tokens that have a successor
    # in the prompt: (request, row of its first such token, its position, end position).
    prompt_logprob_spans: list[tuple[RequestState, int, int, int]] = field(
        default_factory=list)


def build_step_inputs(requests: list[RequestState], num_scheduled: list[int],
                      block_size: int, device: torch.device,
                      earlier_samples: Sequence[str] = ()) -> StepInputs:
    """Lay out the scheduled tokens of `requests` (num_scheduled[i] tokens each, starting
    at its num_computed_tokens) as one flat batch.

    A request may end one token past its known tokens when that token is one the worker
    sampled in its previous step: `earlier_samples` are the requests that step sampled for,
    in the order of its tokens. Such rows hold 0 here until `fill_ahead_tokens`.

    The per-token and per-sequence arrays are packed into one int64 and one int32 buffer,
    so the step costs two host-to-device copies instead of one per array.
    """
    width = max(len(r.block_ids) for r in requests)
    token_ids: list[int] = []
    starts, padded_tables, sample_rows, sample_ids = [], [], [], []
    ahead_rows, ahead_sources, ahead_ids = [], [], []
    prompt_spans = []
    earlier_row: dict[str, int] | None = None
    for req, n in zip(requests, num_scheduled):
        start = req.num_computed_tokens
        if n < 1:
            raise ValueError(f"request {req.req_id!r}: num_scheduled_tokens={n} must be >= 1")
        ahead = start + n == req.num_tokens + 1
        if ahead and earlier_row is None:
            earlier_row = {req_id: row for row, req_id in enumerate(earlier_samples)}
        if start + n > req.num_tokens + ahead or (ahead and req.req_id not in earlier_row):
            raise ValueError(f"request {req.req_id!r}: num_computed_tokens={start} + "
                             f"num_scheduled_tokens={n} exceeds its {req.num_tokens} tokens"
                             + (" (this worker's previous step sampled no token for it)"
                                if ahead else ""))
        if -(-(start + n) // block_size) > len(req.block_ids):
            raise ValueError(f"request {req.req_id!r}: {start + n} tokens need more than its "
                             f"{len(req.block_ids)} blocks of {block_size}")
        prompt_end = min(start + n, len(req.prompt_token_ids) - 1)
        if req.sampling_params.prompt_logprobs is not None and start < prompt_end:
            prompt_spans.append((req, len(token_ids), start, prompt_end))
        token_ids += req.token_slice(start, start + n)
        if ahead:
            ahead_rows.append(len(token_ids))
            ahead_sources.append(earlier_row[req.req_id])
            ahead_ids.append(req.req_id)
            token_ids.append(0)
        starts.append(start)
        padded_tables += req.block_ids
        padded_tables += [0] * (width - len(req.block_ids))
        if start + n >= req.num_tokens:
            sample_rows.append(len(token_ids) - 1)
            sample_ids.append(req.req_id)
    num_reqs, num_tokens = len(requests), len(token_ids)
    per_seq = np.zeros(2 * num_reqs + 1 + num_reqs * width, dtype=np.int32)
    query_start_loc, seq_lens = per_seq[:num_reqs + 1], per_seq[num_reqs + 1:2 * num_reqs + 1]
    block_tables = per_seq[2 * num_reqs + 1:].reshape(num_reqs, width)
    q_lens, starts_np = (np.asarray(num_scheduled, dtype=np.int64),
                         np.asarray(starts, dtype=np.int64))
    np.cumsum(q_lens, out=query_start_loc[1:])
    seq_lens[:] = starts_np + q_lens
    block_tables.reshape(-1)[:] = padded_tables

    num_samples, num_ahead = len(sample_rows), len(ahead_rows)
    per_token = np.empty(3 * num_tokens + num_samples + 2 * num_ahead, dtype=np.int64)
    per_token[:num_tokens] = token_ids
    positions = per_token[num_tokens:2 * num_tokens]
    row_of_token = np.repeat(np.arange(num_reqs), q_lens)
    positions[:] = np.arange(num_tokens) + np.repeat(starts_np - query_start_loc[:-1], q_lens)
    blocks = block_tables[row_of_token, positions // block_size].astype(np.int64)
    per_token[2 * num_tokens:3 * num_tokens] = blocks * block_size + positions % block_size
    samples_end = 3 * num_tokens + num_samples
    per_token[3 * num_tokens:samples_end] = sample_rows
    per_token[samples_end:samples_end + num_ahead] = ahead_rows
    per_token[samples_end + num_ahead:] = ahead_sources

    per_seq_t = to_device(per_seq, device)
    per_token_t = to_device(per_token, device)
    meta = AttentionMetadata(
        slot_mapping=per_token_t[2 * num_tokens:3 * num_tokens],
        query_start_loc=per_seq_t[:num_reqs + 1],
        seq_lens=per_seq_t[num_reqs + 1:2 * num_reqs + 1],
        block_tables=per_seq_t[2 * num_reqs + 1:].view(num_reqs, width),
        decode_only=num_tokens == num_reqs,
    )
    return StepInputs(
        input_ids=per_token_t[:num_tokens],
        positions=per_token_t[num_tokens:2 * num_tokens],
        meta=meta,
        req_ids=[r.req_id for r in requests],
        sample_req_ids=sample_ids,
        logits_indices=per_token_t[3 * num_tokens:samples_end],
        ahead_req_ids=ahead_ids,
        ahead_rows=per_token_t[samples_end:samples_end + num_ahead],
        ahead_sources=per_token_t[samples_end + num_ahead:],
        prompt_logprob_spans=prompt_spans,
    )


def fill_ahead_tokens(inputs: StepInputs, earlier_tokens: torch.Tensor) -> None:
    """Put the tokens sampled in the previous step ([N] on the device) into the input rows
    of the requests that went ahead of it."""
    inputs.input_ids[inputs.ahead_rows] = earlier_tokens[inputs.ahead_sources]

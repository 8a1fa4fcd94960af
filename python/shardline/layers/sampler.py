"""Turn the logits at sampling positions into tokens, one request per row.

Order of processing: the tokens a row may not sample yet (its stop tokens while it is short
of min_tokens) masked to -inf, repetition/presence/frequency penalties, logit_bias added and
the tokens outside allowed_token_ids masked to -inf, then (for sampled rows) temperature,
top-k, top-p and min-p, then the draw. Each row draws its random numbers from its own
generator, so a seeded request samples the same tokens whatever its batch mates are.
Reported logprobs are the log-softmax of the distribution the token was drawn from: the
processed logits for sampled rows, the penalized and biased logits for greedy rows (both
with the masked tokens at -inf).

The sampler only queues device work and returns the tokens as a device tensor; reading
them (and the logprobs) to the host is a separate call, so a step's host work can wait
for a later moment (see SamplerOutput).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from shardline.device_copy import to_device
from shardline.layers.token_sets import BlockedTokens, TokenBias, apply_bias, mask_blocked
from shardline.step import TokenLogprobs
from shardline.sampling_params import SamplingParams


@dataclass
class SamplingBatch:
    """Per row: its settings, its token history (for penalties), its generator, the
    token ids it may not sample in this step (none for any row when empty; a request's
    BlockedTokens, or an array or list of ids: see mask_blocked) and its bias
    arrays (None for a row without logit_bias or allowed_token_ids).

    The sampler reads a row's logit_bias and allowed_token_ids only from `token_bias`,
    never from its params. Left out, it is made here from the params; the model runner
    hands over the arrays its requests keep, made once each."""

    params: list[SamplingParams]
    prompt_token_ids: list[list[int]]
    output_token_ids: list[list[int]]
    generators: list[torch.Generator]
    blocked_token_ids: list[BlockedTokens | np.ndarray | list[int]] = field(
        default_factory=list)
    token_bias: list[TokenBias | None] | None = None

    def __post_init__(self) -> None:
        if self.token_bias is None:
            self.token_bias = [TokenBias.of(p) for p in self.params]


def _token_counts(token_lists: list[list[int]], vocab_size: int,
                  device: torch.device) -> torch.Tensor:
    """[N, V] occurrence counts; out-of-vocabulary ids are ignored. The ids reach the
    device through pinned memory: a step holding a penalized request must not wait for
    the step in flight before it."""
    width = max((len(t) for t in token_lists), default=0)
    ids = torch.full((len(token_lists), width), vocab_size, dtype=torch.long)
    for i, tokens in enumerate(token_lists):
        ids[i, :len(tokens)] = torch.tensor(tokens, dtype=torch.long)
    ids = to_device(ids.clamp(max=vocab_size), device)
    counts = torch.zeros(len(token_lists), vocab_size + 1, device=device)
    counts.scatter_add_(1, ids, torch.ones_like(ids, dtype=counts.dtype))
    return counts[:, :vocab_size]


def _column(values: list[float], like: torch.Tensor) -> torch.Tensor:
    return to_device(values, like.device, like.dtype)[:, None]


def apply_penalties(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Repetition penalty over prompt and output tokens (positive logits divided, negative
    multiplied); presence and frequency penalties over output tokens (OpenAI semantics).
    Written into `logits` itself, which it returns."""
    params = batch.params
    if not any(p.needs_token_history for p in params):
        return logits
    vocab, device = logits.shape[1], logits.device
    out_counts = _token_counts(batch.output_token_ids, vocab, device)
    seen = (_token_counts(batch.prompt_token_ids, vocab, device) > 0) | (out_counts > 0)
    rep = _column([p.repetition_penalty for p in params], logits)
    penalized = torch.where(logits > 0, logits / rep, logits * rep)
    torch.where(seen, penalized, logits, out=logits)
    logits.sub_(_column([p.frequency_penalty for p in params], logits) * out_counts)
    return logits.sub_(_column([p.presence_penalty for p in params], logits) * (out_counts > 0))


def apply_filters(logits: torch.Tensor, params: list[SamplingParams],
                  in_place: bool = False) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p masks (masked logits become -inf): a new
    tensor, or with `in_place` `logits` itself, overwritten."""
    device, vocab = logits.device, logits.shape[1]
    temperatures = [p.temperature if p.temperature > 0 else 1.0 for p in params]
    logits = (logits.div_ if in_place else logits.div)(_column(temperatures, logits))
    top_k = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
    # top_p = 1 keeps every token: compared with the mass before each token, which fp32
    # rounding takes above 1 in the tail, it dropped some (of rows with top_k, or with no
    # filter at all but batch mates that have one).
    top_p = [p.top_p if p.top_p < 1.0 else math.inf for p in params]
    if any(k < vocab for k in top_k) or any(p < 1.0 for p in top_p):
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        rank = torch.arange(vocab, device=device)[None, :]
        drop = rank >= to_device(top_k, device, torch.int64)[:, None]
        sorted_logits.masked_fill_(drop, float("-inf"))
        probs = sorted_logits.softmax(dim=-1)
        drop |= (probs.cumsum(dim=-1) - probs) > _column(top_p, logits)
        sorted_logits.masked_fill_(drop, float("-inf"))
        # `order` is each row's permutation: every place of `logits` is written.
        logits.scatter_(1, order, sorted_logits)
    min_p = [p.min_p for p in params]
    if any(m > 0.0 for m in min_p):
        probs = logits.softmax(dim=-1)
        drop = probs < _column(min_p, logits) * probs.max(dim=-1, keepdim=True).values
        logits.masked_fill_(drop, float("-inf"))
    return logits


def draw(probs: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
    """One token per row of probs [N, V]: the argmax of p / E with E ~ Exp(1), which picks
    token t with probability p[t], never one of probability 0. Row i's noise comes from
    generators[i]; rows that share a generator draw their noise in one call."""
    noise = torch.empty_like(probs)
    rows_of: dict[int, list[int]] = {}
    for row, gen in enumerate(generators):
        rows_of.setdefault(id(gen), []).append(row)
    for rows in rows_of.values():
        gen = generators[rows[0]]
        if len(rows) == 1:
            noise[rows[0]].exponential_(generator=gen)
        else:
            shared = torch.empty(len(rows), probs.shape[1], dtype=probs.dtype,
                                 device=probs.device).exponential_(generator=gen)
            noise[to_device(rows, probs.device, torch.int64)] = shared
    # torch's CPU exponential_ can return 0 (-log(1 - u) at u = 0, pytorch#22557): 0 / 0
    # would be NaN, which argmax takes as the largest, drawing a token filtered out.
    noise.clamp_(min=torch.finfo(noise.dtype).tiny)
    return torch.div(probs, noise, out=noise).argmax(dim=-1)


@dataclass
class SamplerOutput:
    """One step's tokens [N] on the device and, for the rows that asked for logprobs, the
    sampled token's logprob and the top-n alternatives (n = the largest asked for)."""

    token_ids: torch.Tensor
    logprobs_wanted: list[int | None]
    sampled_logprobs: torch.Tensor | None = None
    top_logprobs: torch.Tensor | None = None
    top_token_ids: torch.Tensor | None = None
    _host: dict[str, torch.Tensor] = field(default_factory=dict, init=False, repr=False)
    _copied: torch.cuda.Event | None = field(default=None, init=False, repr=False)

    _RESULTS = ("token_ids", "sampled_logprobs", "top_logprobs", "top_token_ids")

    def start_host_copy(self) -> None:
        """On a GPU, queue the results' copies to pinned host memory right behind the
        work that computes them, and mark where they end. A read of the device later,
        once the next step is queued too, would wait for that step as well."""
        if self.token_ids.device.type != "cuda":
            return
        for name in self._RESULTS:
            value = getattr(self, name)
            if value is not None:
                self._host[name] = value.to("cpu", non_blocking=True)
        self._copied = torch.cuda.Event()
        self._copied.record()

    def _read(self, name: str) -> list:
        return self._host.get(name, getattr(self, name)).tolist()

    def to_host(self) -> tuple[list[int], list[TokenLogprobs | None]]:
        """The tokens and logprobs as Python values: waits for the device to compute them
        (only them, after start_host_copy), one transfer per tensor."""
        if self._copied is not None:
            self._copied.synchronize()
        tokens = self._read("token_ids")
        logprobs: list[TokenLogprobs | None] = [None] * len(tokens)
        if self.sampled_logprobs is not None:
            sampled = self._read("sampled_logprobs")
            top_values, top_ids = self._read("top_logprobs"), self._read("top_token_ids")
            for i, n in enumerate(self.logprobs_wanted):
                if n is not None:
                    logprobs[i] = TokenLogprobs(sampled_logprob=sampled[i],
                                                top_token_ids=top_ids[i][:n],
                                                top_logprobs=top_values[i][:n])
        return tokens, logprobs


class Sampler:
    """Greedy, temperature and filtered sampling with optional top-n logprobs."""

    def __call__(self, logits: torch.Tensor, batch: SamplingBatch,
                 overwrite: bool = False) -> SamplerOutput:
        """logits [N, V] (one row per request in `batch`) -> N tokens and their logprobs.

        The masks, penalties, biases and filters are written into one fp32 [N, V] tensor:
        the logits themselves with `overwrite` (the caller reads them no more: the model
        runner's are the LM head's output for this call alone) or when they are not fp32
        (`float()` copied them), else one copy, made only if a row has something to write,
        which leaves the caller's logits as they were."""
        work = logits.float()
        writable = overwrite or work is not logits
        if not writable and (any(map(len, batch.blocked_token_ids)) or any(
                p.needs_token_history for p in batch.params) or any(
                b is not None for b in batch.token_bias)):
            work, writable = work.clone(), True
        work = apply_bias(apply_penalties(mask_blocked(work, batch.blocked_token_ids), batch),
                          batch.token_bias)
        greedy = [p.greedy for p in batch.params]
        wanted = [p.logprobs for p in batch.params]
        # Greedy rows report logprobs of the logits before the filters: when one asks, the
        # filters write a copy (the one kept here), leaving `work` as it is.
        greedy_logprobs = any(g and n is not None for g, n in zip(greedy, wanted))
        tokens = work.argmax(dim=-1)
        processed = work
        if not all(greedy):
            processed = apply_filters(work, batch.params,
                                      in_place=writable and not greedy_logprobs)
            rows = [i for i, g in enumerate(greedy) if not g]
            if len(rows) == len(greedy):
                tokens = draw(processed.softmax(dim=-1), batch.generators)
            else:
                row_index = to_device(rows, tokens.device, torch.int64)
                tokens[row_index] = draw(processed[row_index].softmax(dim=-1),
                                         [batch.generators[i] for i in rows])
        out = SamplerOutput(token_ids=tokens, logprobs_wanted=wanted)
        if any(n is not None for n in wanted):
            rows_lp = processed
            if processed is not work and greedy_logprobs:
                is_greedy = to_device(greedy, work.device, torch.bool)[:, None]
                rows_lp = torch.where(is_greedy, work, processed)
            rows_lp = rows_lp.log_softmax(dim=-1)
            out.sampled_logprobs = rows_lp.gather(1, tokens[:, None])[:, 0]
            top_n = min(max(n for n in wanted if n is not None), rows_lp.shape[1])
            out.top_logprobs, out.top_token_ids = rows_lp.topk(top_n)
        out.start_host_copy()
        return out

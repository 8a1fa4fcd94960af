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
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import torch

from shardline.device_copy import to_device
from shardline.step import TokenLogprobs
from shardline.sampling_params import SamplingParams


class TokenSet:
    """Token ids of one request, each once, that the sampler writes into its row of logits
    every step: masks them (BlockedTokens, allowed_token_ids) or, with a float value each,
    adds those (logit_bias). Made once per request: the worker keeps them on its state.

    The ids may be as many as the vocabulary. Written by index, each id costs host work, a
    device copy and a scattered write every step (8 rows x 151k ids: 18-50 ms a step, CPU),
    so from an eighth of the vocabulary on, where a vocabulary row is no bigger than the
    ids, the sampler writes by such a row instead: made on the device at its first use and
    kept, it costs one pass over the row whatever the ids' count. It is a bool mask, True
    at the ids, or with values a float32 row holding each id's value and 0 elsewhere."""

    # A vocabulary row is used from len(ids) >= vocab / _ROW_FROM_FRACTION on.
    _ROW_FROM_FRACTION = 8

    def __init__(self, ids: Iterable[int] | np.ndarray, values: np.ndarray | None = None,
                 what: str = "token id") -> None:
        ids = np.asarray(ids if isinstance(ids, np.ndarray) else list(ids), dtype=np.int64)
        if values is not None and len(values) != len(ids):
            raise ValueError(f"{len(values)} values for {len(ids)} {what}s: one each needed")
        self.ids, first = np.unique(ids, return_index=True)
        self.values = None if values is None else np.asarray(values, np.float32)[first]
        self._what = what
        self._row: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def uses_row(self, vocab: int) -> bool:
        """Whether the sampler writes these ids, over `vocab` logits, by their row."""
        return len(self.ids) * self._ROW_FROM_FRACTION >= vocab > 0

    def row(self, vocab: int, device: torch.device) -> torch.Tensor:
        """[vocab] on `device`: bool, True at the ids, or float32, the values at the ids
        and 0 elsewhere; made on the first call, again only for another vocabulary size or
        device."""
        row = self._row
        if row is not None and row.shape[0] == vocab and row.device == device:
            return row
        if len(self.ids) and not 0 <= self.ids[0] <= self.ids[-1] < vocab:
            bad = self.ids[0] if self.ids[0] < 0 else self.ids[-1]
            raise ValueError(f"{self._what} {bad} is invalid: outside the vocabulary "
                             f"[0, {vocab})")
        ids = to_device(self.ids, device)
        if self.values is None:
            row = torch.zeros(vocab, dtype=torch.bool, device=device)
            row[ids] = True
        else:
            row = torch.zeros(vocab, dtype=torch.float32, device=device)
            row[ids] = to_device(self.values, device)
        self._row = row
        return row


class BlockedTokens(TokenSet):
    """One request's token ids that the sampler masks to -inf (its stop tokens while it is
    short of min_tokens), by index or, when they are many, by a vocabulary mask (see
    TokenSet)."""

    def __init__(self, ids: Iterable[int] | np.ndarray) -> None:
        super().__init__(ids, what="blocked token id")


@dataclass(frozen=True, eq=False)
class TokenBias:
    """One request's logit_bias and allowed_token_ids as the arrays the sampler copies to
    the device: the biased ids (int64, each once), their biases (float32) and the allowed
    ids (int64; empty when every token is allowed). A bias may cover the whole vocabulary
    (made from its dict each step, 8 rows x 32000 biases cost 46 ms of host work a step),
    so they are made once per request: the worker keeps them on the request's state.
    `biased` and `permitted` hold them as the TokenSets the sampler writes by (by index,
    or by a vocabulary row made once when they are many)."""

    ids: np.ndarray
    values: np.ndarray
    allowed: np.ndarray
    biased: TokenSet = field(init=False, repr=False)
    permitted: TokenSet = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "biased", TokenSet(self.ids, self.values, "logit_bias id"))
        object.__setattr__(self, "permitted", TokenSet(self.allowed, what="allowed token id"))

    @classmethod
    def of(cls, params: SamplingParams) -> TokenBias | None:
        """The arrays of `params`, or None when it has neither field (the sampler passes
        over such a row after one look)."""
        bias, allowed = params.logit_bias, params.allowed_token_ids
        if not (bias or allowed):
            return None
        bias = bias or {}
        return cls(np.fromiter(bias, np.int64, len(bias)),
                   np.fromiter(bias.values(), np.float32, len(bias)),
                   np.asarray(allowed or [], dtype=np.int64))


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


def mask_blocked(logits: torch.Tensor,
                 blocked: list[BlockedTokens | np.ndarray | list[int]]) -> torch.Tensor:
    """The logits with each row's blocked token ids at -inf (a new tensor if any are).

    Rows whose ids are a BlockedTokens many enough to mask by its vocabulary mask (see
    TokenSet) are masked by their masks, stacked, in one pass over those rows; the
    others by index, their ids copied to the device in one array. A row's ids may number
    a vocabulary: they are best made once per request (ModelRunner does)."""
    if not any(map(len, blocked)):
        return logits
    vocab, device = logits.shape[1], logits.device
    index_rows: list[int] = []
    index_ids: list[np.ndarray] = []
    mask_rows: list[int] = []
    for row, ids in enumerate(blocked):
        if not len(ids):
            continue
        if isinstance(ids, BlockedTokens):
            if ids.uses_row(vocab):
                mask_rows.append(row)
                continue
            ids = ids.ids
        index_rows.append(row)
        index_ids.append(np.asarray(ids, dtype=np.int64))
    if index_rows:
        counts = [len(ids) for ids in index_ids]
        index = np.empty((2, sum(counts)), dtype=np.int64)
        index[0] = np.repeat(np.asarray(index_rows, dtype=np.int64), counts)
        index[1] = np.concatenate(index_ids)
        index_t = to_device(index, device)
        logits = logits.index_put((index_t[0], index_t[1]),
                                  logits.new_full((index.shape[1],), -math.inf))
    if not mask_rows:
        return logits
    masks = torch.stack([blocked[row].row(vocab, device) for row in mask_rows])
    if len(mask_rows) == len(blocked):
        return logits.masked_fill(masks, -math.inf)
    if not index_rows:
        logits = logits.clone()
    rows = to_device(mask_rows, device, torch.int64)
    logits[rows] = logits[rows].masked_fill_(masks, -math.inf)
    return logits


def _column(values: list[float], like: torch.Tensor) -> torch.Tensor:
    return to_device(values, like.device, like.dtype)[:, None]


def apply_penalties(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Repetition penalty over prompt and output tokens (positive logits divided, negative
    multiplied); presence and frequency penalties over output tokens (OpenAI semantics)."""
    params = batch.params
    if not any(p.needs_token_history for p in params):
        return logits
    vocab, device = logits.shape[1], logits.device
    out_counts = _token_counts(batch.output_token_ids, vocab, device)
    seen = (_token_counts(batch.prompt_token_ids, vocab, device) > 0) | (out_counts > 0)
    rep = _column([p.repetition_penalty for p in params], logits)
    penalized = torch.where(logits > 0, logits / rep, logits * rep)
    logits = torch.where(seen, penalized, logits)
    logits = logits - _column([p.frequency_penalty for p in params], logits) * out_counts
    return logits - _column([p.presence_penalty for p in params], logits) * (out_counts > 0)


def _by_form(sets: list[tuple[int, TokenSet]],
             vocab: int) -> tuple[list[tuple[int, TokenSet]], list[tuple[int, TokenSet]]]:
    """(row, ids) pairs split into those written by index and those by their row."""
    return ([(row, s) for row, s in sets if not s.uses_row(vocab)],
            [(row, s) for row, s in sets if s.uses_row(vocab)])


def _coordinates(sets: list[tuple[int, TokenSet]]) -> list[np.ndarray]:
    """The rows and the ids of each (row, ids) pair's ids, as two int64 arrays."""
    counts = [len(s) for _, s in sets]
    return [np.repeat(np.asarray([row for row, _ in sets], dtype=np.int64), counts),
            np.concatenate([np.empty(0, np.int64), *(s.ids for _, s in sets)])]


def _stacked_rows(sets: list[tuple[int, TokenSet]], vocab: int,
                  device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows of (row, ids) pairs written by their vocabulary rows, on the device, and
    those vocabulary rows stacked."""
    return (to_device([row for row, _ in sets], device, torch.int64),
            torch.stack([s.row(vocab, device) for _, s in sets]))


def apply_bias(logits: torch.Tensor, token_bias: list[TokenBias | None]) -> torch.Tensor:
    """Each row's logit_bias added to its logits, and for a row with allowed_token_ids every
    other token at -inf (a new tensor if any row has either; the same one, after one look
    at each row, if none has). A token at -inf stays there whatever its bias.

    `token_bias` holds each row's arrays (see TokenBias). A row's allowed ids and biases are
    written by index, or, when they number an eighth of the vocabulary, by a mask and a
    bias row made once per request (see TokenSet). The ids written by index go to the
    device in one copy, their biases in another."""
    rows = [row for row, arrays in enumerate(token_bias) if arrays is not None]
    if not rows:
        return logits
    vocab, device = logits.shape[1], logits.device
    allow_index, allow_rows = _by_form([(row, token_bias[row].permitted) for row in rows
                                        if len(token_bias[row].permitted)], vocab)
    bias_index, bias_rows = _by_form([(row, token_bias[row].biased) for row in rows
                                      if len(token_bias[row].biased)], vocab)
    num_bias = sum(len(s) for _, s in bias_index)
    num_allowed = sum(len(s) for _, s in allow_index)
    if bias_index or allow_index:
        # Rows of the biases, their ids, rows of the allowed ids, those ids, limited rows.
        ints_t = to_device(np.concatenate([
            *_coordinates(bias_index), *_coordinates(allow_index),
            np.asarray([row for row, _ in allow_index], dtype=np.int64)]), device)
    if len(allow_rows) == len(token_bias):
        logits = torch.where(_stacked_rows(allow_rows, vocab, device)[1], logits, -math.inf)
    elif allow_index or allow_rows:
        keep = torch.ones_like(logits, dtype=torch.bool)
        if allow_index:
            start = 2 * num_bias
            keep[ints_t[start + 2 * num_allowed:]] = False
            keep[ints_t[start:start + num_allowed],
                 ints_t[start + num_allowed:start + 2 * num_allowed]] = True
        if allow_rows:
            index, masks = _stacked_rows(allow_rows, vocab, device)
            keep[index] = masks
        logits = torch.where(keep, logits, -math.inf)
    if bias_index:
        # A row's ids are each once, so no place is written twice.
        index = (ints_t[:num_bias], ints_t[num_bias:2 * num_bias])
        values = to_device(np.concatenate([s.values for _, s in bias_index]), device,
                           logits.dtype)
        logits = logits.index_put(index, logits[index] + values)
    if bias_rows:
        index, dense = _stacked_rows(bias_rows, vocab, device)
        if len(bias_rows) == len(token_bias):
            return logits + dense.to(logits.dtype)
        if not (bias_index or allow_index or allow_rows):
            logits = logits.clone()
        logits[index] += dense.to(logits.dtype)
    return logits

def apply_filters(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p masks (masked logits become -inf)."""
    device, vocab = logits.device, logits.shape[1]
    temperatures = [p.temperature if p.temperature > 0 else 1.0 for p in params]
    logits = logits / _column(temperatures, logits)
    top_k = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
    # top_p = 1 keeps every token: compared with the mass before each token, which fp32
    # rounding takes above 1 in the tail, it dropped some (of rows with top_k, or with no
    # filter at all but batch mates that have one).
    top_p = [p.top_p if p.top_p < 1.0 else math.inf for p in params]
    if any(k < vocab for k in top_k) or any(p < 1.0 for p in top_p):
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        rank = torch.arange(vocab, device=device)[None, :]
        drop = rank >= to_device(top_k, device, torch.int64)[:, None]
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        probs = sorted_logits.softmax(dim=-1)
        drop |= (probs.cumsum(dim=-1) - probs) > _column(top_p, logits)
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.empty_like(logits).scatter_(1, order, sorted_logits)
    min_p = [p.min_p for p in params]
    if any(m > 0.0 for m in min_p):
        probs = logits.softmax(dim=-1)
        drop = probs < _column(min_p, logits) * probs.max(dim=-1, keepdim=True).values
        logits = logits.masked_fill(drop, float("-inf"))
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
    return (probs / noise.clamp_(min=torch.finfo(noise.dtype).tiny)).argmax(dim=-1)


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

    def __call__(self, logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
        """logits [N, V] (one row per request in `batch`) -> N tokens and their logprobs."""
        logits = apply_penalties(mask_blocked(logits.float(), batch.blocked_token_ids), batch)
        logits = apply_bias(logits, batch.token_bias)
        greedy = [p.greedy for p in batch.params]
        tokens = logits.argmax(dim=-1)
        processed = logits
        if not all(greedy):
            processed = apply_filters(logits, batch.params)
            rows = [i for i, g in enumerate(greedy) if not g]
            row_index = to_device(rows, tokens.device, torch.int64)
            drawn = draw(processed[row_index].softmax(dim=-1),
                         [batch.generators[i] for i in rows])
            tokens[row_index] = drawn
        wanted = [p.logprobs for p in batch.params]
        out = SamplerOutput(token_ids=tokens, logprobs_wanted=wanted)
        if any(n is not None for n in wanted):
            is_greedy = to_device(greedy, logits.device, torch.bool)[:, None]
            rows = torch.where(is_greedy, logits, processed).log_softmax(dim=-1)
            out.sampled_logprobs = rows.gather(1, tokens[:, None])[:, 0]
            top_n = min(max(n for n in wanted if n is not None), rows.shape[1])
            out.top_logprobs, out.top_token_ids = rows.topk(top_n)
        out.start_host_copy()
        return out

"""What a request does to chosen tokens' logits, and how the sampler writes it.

A request may block tokens (its stop tokens while it is short of min_tokens), bias them
(logit_bias) or allow only them (allowed_token_ids). Each is a TokenSet made once per
request, kept by the worker on the request's state: written by index while it is small, by
a vocabulary row made once on the device when it is large, so that a step's cost does not
grow with a vocabulary-sized set. mask_blocked and apply_bias write a batch's sets into
its logits; the sampler (shardline.layers.sampler) calls them in its order.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import torch

from shardline.device_copy import to_device
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


def mask_blocked(logits: torch.Tensor,
                 blocked: list[BlockedTokens | np.ndarray | list[int]]) -> torch.Tensor:
    """Each row's blocked token ids set to -inf in `logits` itself, which it returns: the
    sampler hands over logits of its own (see Sampler), so no copy of [N, V] is made.

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
        logits.index_put_((index_t[0], index_t[1]),
                          logits.new_full((index.shape[1],), -math.inf))
    if not mask_rows:
        return logits
    masks = torch.stack([blocked[row].row(vocab, device) for row in mask_rows])
    if len(mask_rows) == len(blocked):
        return logits.masked_fill_(masks, -math.inf)
    rows = to_device(mask_rows, device, torch.int64)
    logits[rows] = logits[rows].masked_fill_(masks, -math.inf)
    return logits


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
    other token set to -inf, in `logits` itself, which it returns (after one look at each
    row, untouched, if no row has either). A token at -inf stays there whatever its bias.

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
        torch.where(_stacked_rows(allow_rows, vocab, device)[1], logits,
                    logits.new_full((), -math.inf), out=logits)
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
        torch.where(keep, logits, logits.new_full((), -math.inf), out=logits)
    if bias_index:
        # A row's ids are each once, so no place is written twice.
        index = (ints_t[:num_bias], ints_t[num_bias:2 * num_bias])
        values = to_device(np.concatenate([s.values for _, s in bias_index]), device,
                           logits.dtype)
        logits.index_put_(index, logits[index] + values)
    if bias_rows:
        index, dense = _stacked_rows(bias_rows, vocab, device)
        if len(bias_rows) == len(token_bias):
            return logits.add_(dense.to(logits.dtype))
        logits[index] += dense.to(logits.dtype)
    return logits

"""What the engine returns to callers: one RequestOutput per request, one CompletionOutput
per generated sequence (several when n > 1)."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from collections.abc import Sequence as SequenceABC
from dataclasses import dataclass, field
from typing import Generic, TypeVar, overload

T = TypeVar("T")


class ListSnapshot(SequenceABC, Generic[T]):
    """The first `length` items of a list that only ever grows, taken in O(1).

    The engine appends each new token to one list per sequence and hands callers a
    snapshot per step, so building a step's output costs the same at token 2000 as at
    token 2, and an output kept from an earlier step still shows only the tokens it had.
    It reads like a list (len, indexing, slicing, iteration, `==` with a list or tuple);
    `list(snapshot)` gives a copy for anything else. Pickled or copied (copy.deepcopy,
    dataclasses.asdict) it becomes a list of its own items: a copy must copy them anyway,
    and it then neither carries the tokens added after the snapshot nor stops json.dumps.
    """

    __slots__ = ("_items", "_length")

    def __init__(self, items: list[T], length: int | None = None) -> None:
        self._items = items
        self._length = len(items) if length is None else length

    def __len__(self) -> int:
        return self._length

    @overload
    def __getitem__(self, index: int) -> T: ...
    @overload
    def __getitem__(self, index: slice) -> list[T]: ...

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self._items[i] for i in range(*index.indices(self._length))]
        if index < 0:
            index += self._length
        if not 0 <= index < self._length:
            raise IndexError(f"index {index} is out of range for {self._length} items")
        return self._items[index]

    def __iter__(self) -> Iterator[T]:
        return itertools.islice(self._items, self._length)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (ListSnapshot, list, tuple)):
            return len(other) == self._length and all(a == b for a, b in zip(self, other))
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # equal to lists, which are unhashable

    def __repr__(self) -> str:
        return repr(list(self))

    def __reduce__(self) -> tuple[type[list], tuple[list[T]]]:
        return list, (list(self),)


@dataclass
class CompletionOutput:
    """One generated sequence so far (cumulative, not a delta).

    `token_ids` include a stop or eos token that ended the sequence; `text` does not, and a
    stop string and everything after it are cut from `text`. So that a later output never
    takes text back, an unfinished completion's `text` leaves out its last characters while
    they could still begin a stop string (they show once they cannot, or when it
    finishes); `token_ids` are never held back, so they may be ahead of `text`.
    `finish_reason` is "stop", "length" or "abort" once finished; `stop_reason` is the stop
    string or stop token id that matched (None for eos or length). `logprobs` (when
    requested) maps, per generated token, token id -> log-probability for the top
    alternatives and the sampled token.
    `token_ids` and `logprobs` are read-only ListSnapshots of lists the engine keeps
    growing, so a step's output costs the same however long the sequence is; `list(...)`
    copies one, and a pickled or copied output holds plain lists.
    """

    index: int
    text: str
    token_ids: SequenceABC[int]
    cumulative_logprob: float | None = None
    logprobs: SequenceABC[dict[int, float]] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    @property
    def finished(self) -> bool:
        """Whether the completion has ended (its finish_reason is set)."""
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """A request's prompt and its `n` completions; `finished` once all of them are.

    `request_id` is the caller's (LLM.generate names its requests "gen-N"); `prompt` is the
    prompt text (chat's rendered conversation), None for a prompt given as token ids;
    `outputs` holds one CompletionOutput per sample, in `index` order; `num_cached_tokens`
    counts the prompt tokens its samples found in the prefix cache when first scheduled
    (summed over them; a resume after preemption does not count). `prompt_logprobs`, when
    asked for (SamplingParams.prompt_logprobs), has one entry per prompt token: None for
    the first, then token id -> log-probability for the prompt token (given the tokens
    before it, from the raw model logits: no penalties, filters or temperature) and the
    k most likely tokens there. The first sample computes them with its prompt, so they
    are all there once its first token is (before that, as far as its prompt has been
    computed).
    Every output of one request shares the same `prompt_token_ids` list (it is not copied
    per step): treat it as read-only. Outputs pickle, and copy (dataclasses.asdict then
    json.dumps included), with plain lists.
    """

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = False
    num_cached_tokens: int = 0
    prompt_logprobs: SequenceABC[dict[int, float] | None] | None = None

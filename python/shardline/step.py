"""What one engine step hands the executor, and what comes back.

These cross process boundaries (the shm rings) every step, so they are plain data: lists,
ints, strings and dicts, with `to_dict` / `from_dict` for msgpack. No tensors of the
engine's own. Each step's cost on the wire grows with the objects in it, and in steady
decode nearly all of a step is its cached requests: they travel as columns (one list per
field, `CachedRequests`), which the worker uses as they arrive. Building one record per
request on the receiving side cost about half a microsecond each, as much as the rest of
the step's decoding together. The rarer per-request records (new requests, logprobs) are
NamedTuples, which msgpack packs as arrays with no Python call per record.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple


class NewRequestData(NamedTuple):
    """A request the workers have not seen yet, or one resumed after preemption.

    `output_token_ids` is non-empty only on resumption: the tokens generated before the
    request was preempted, recomputed together with the prompt.
    """

    req_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    sampling_params: dict
    block_ids: list[int]
    num_computed_tokens: int


class CachedRequestData(NamedTuple):
    """A request the workers already hold state for.

    `new_token_ids` are the tokens the engine appended since the workers last saw the
    request (the tokens sampled in earlier steps); `new_block_ids` extend its block table.
    """

    req_id: str
    new_token_ids: list[int]
    new_block_ids: list[int]
    num_computed_tokens: int


@dataclass
class CachedRequests:
    """A step's cached requests as columns, in step order.

    In steady decode a cached request brings one new token and no new block, so the
    columns hold what the common case needs and no more: `new_token_ids` is one flat list,
    split by `num_new_tokens` (None when every request brings exactly one), and
    `new_block_ids` lists [position, block ids] only for the requests that got blocks.
    Iterating yields one CachedRequestData per request, for readers that want records.
    """

    req_ids: list[str] = field(default_factory=list)
    new_token_ids: list[int] = field(default_factory=list)
    num_new_tokens: list[int] | None = None
    new_block_ids: list[list] = field(default_factory=list)
    num_computed_tokens: list[int] = field(default_factory=list)

    @classmethod
    def of(cls, records: Iterable[CachedRequestData]) -> "CachedRequests":
        cached = cls()
        for record in records:
            cached.append(*record)
        return cached

    def append(self, req_id: str, new_token_ids: list[int], new_block_ids: list[int],
               num_computed_tokens: int) -> None:
        if len(new_token_ids) != 1 and self.num_new_tokens is None:
            self.num_new_tokens = [1] * len(self.req_ids)
        if self.num_new_tokens is not None:
            self.num_new_tokens.append(len(new_token_ids))
        if new_block_ids:
            self.new_block_ids.append([len(self.req_ids), new_block_ids])
        self.req_ids.append(req_id)
        self.new_token_ids += new_token_ids
        self.num_computed_tokens.append(num_computed_tokens)

    def token_runs(self) -> Iterable[Sequence[int]]:
        """Each request's new token ids, in step order."""
        if self.num_new_tokens is None:
            return zip(self.new_token_ids)
        ends = list(itertools.accumulate(self.num_new_tokens))
        return [self.new_token_ids[end - n:end] for n, end in zip(self.num_new_tokens, ends)]

    def __len__(self) -> int:
        return len(self.req_ids)

    def __iter__(self) -> Iterator[CachedRequestData]:
        blocks = [[] for _ in self.req_ids]
        for position, block_ids in self.new_block_ids:
            blocks[position] = list(block_ids)
        return map(CachedRequestData, self.req_ids, map(list, self.token_runs()), blocks,
                   self.num_computed_tokens)


@dataclass
class SchedulerOutput:
    """One step's work: for each scheduled request, how many tokens to compute.

    A request samples a token in this step exactly when, after this step, all of its
    known tokens have been computed (its prefill is complete, or it is decoding). Every
    request in `num_scheduled_tokens` is one of `new_requests` or `cached_requests`.
    """

    new_requests: list[NewRequestData] = field(default_factory=list)
    cached_requests: CachedRequests = field(default_factory=CachedRequests)
    num_scheduled_tokens: dict[str, int] = field(default_factory=dict)
    finished_req_ids: list[str] = field(default_factory=list)

    @property
    def total_num_scheduled_tokens(self) -> int:
        return sum(self.num_scheduled_tokens.values())

    @property
    def is_empty(self) -> bool:
        return not self.num_scheduled_tokens

    @property
    def req_ids(self) -> list[str]:
        """The ids of the new requests, then of the cached ones: the workers' batch order."""
        return [r.req_id for r in self.new_requests] + self.cached_requests.req_ids

    def to_dict(self) -> dict:
        """The wire form: cached requests as columns, and the scheduled token counts as one
        list in `req_ids` order (0 for a request the step does not schedule), or None when
        every request is scheduled one token (a decode step)."""
        cached = self.cached_requests
        counts = list(map(self.num_scheduled_tokens.get, self.req_ids, itertools.repeat(0)))
        return {"new_requests": self.new_requests,
                "cached_requests": [cached.req_ids, cached.new_token_ids, cached.num_new_tokens,
                                    cached.new_block_ids, cached.num_computed_tokens],
                "num_scheduled_tokens": None if counts.count(1) == len(counts) else counts,
                "finished_req_ids": self.finished_req_ids}

    @classmethod
    def from_dict(cls, data: dict) -> "SchedulerOutput":
        out = cls(new_requests=list(map(_new_request, data["new_requests"])),
                  cached_requests=CachedRequests(*data["cached_requests"]),
                  finished_req_ids=data["finished_req_ids"])
        counts = data["num_scheduled_tokens"]
        out.num_scheduled_tokens = (dict.fromkeys(out.req_ids, 1) if counts is None
                                    else dict(zip(out.req_ids, counts)))
        return out


class TokenLogprobs(NamedTuple):
    """Log-probabilities at one position: the sampled token's and the top-n alternatives."""

    sampled_logprob: float
    top_token_ids: list[int]
    top_logprobs: list[float]


class PromptLogprobs(NamedTuple):
    """Log-probabilities of consecutive prompt tokens of one request, computed in one step:
    prompt token `first_index` and those after it, each given the tokens before it. Per
    token its own logprob and the top-k alternatives (k as the request asked, maybe 0)."""

    req_id: str
    first_index: int
    logprobs: list[float]
    top_token_ids: list[list[int]]
    top_logprobs: list[list[float]]


@dataclass
class ModelRunnerOutput:
    """The tokens sampled in one step, one per request that reached a sampling point, and
    the prompt logprobs of the requests that asked for them and computed prompt tokens."""

    req_ids: list[str] = field(default_factory=list)
    sampled_token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs | None] = field(default_factory=list)
    prompt_logprobs: list[PromptLogprobs] = field(default_factory=list)

    def to_dict(self) -> dict:
        """The wire form; `logprobs` is None when no request of the step asked for them,
        `prompt_logprobs` when the step computed none."""
        return {"req_ids": self.req_ids, "sampled_token_ids": self.sampled_token_ids,
                "logprobs": self.logprobs if any(self.logprobs) else None,
                "prompt_logprobs": self.prompt_logprobs or None}

    @classmethod
    def from_dict(cls, data: dict) -> "ModelRunnerOutput":
        logprobs = data["logprobs"]
        return cls(
            req_ids=data["req_ids"],
            sampled_token_ids=data["sampled_token_ids"],
            logprobs=[None] * len(data["req_ids"]) if logprobs is None else
            [lp if lp is None else _token_logprobs(lp) for lp in logprobs],
            prompt_logprobs=list(map(_prompt_logprobs, data["prompt_logprobs"] or ())),
        )


# Each builds its record from the wire list without a Python-level call.
_new_request = functools.partial(tuple.__new__, NewRequestData)
_token_logprobs = functools.partial(tuple.__new__, TokenLogprobs)
_prompt_logprobs = functools.partial(tuple.__new__, PromptLogprobs)

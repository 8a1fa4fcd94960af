"""What one engine step hands the executor, and what comes back.

These cross process boundaries (the shm rings) every step, so they are plain data: lists,
ints, strings and dicts, with `to_dict` / `from_dict` for msgpack. No tensors of the
engine's own. The per-request records are NamedTuples: msgpack packs a tuple as an array
with no Python call per record, and the receiver rebuilds each with `tuple.__new__`, so a
step's conversion costs the same few microseconds at 1 request or 256 (a dataclass per
record cost about half a microsecond each way, `dataclasses.asdict` far more).
"""

from __future__ import annotations

import functools
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
class SchedulerOutput:
    """One step's work: for each scheduled request, how many tokens to compute.

    A request samples a token in this step exactly when, after this step, all of its
    known tokens have been computed (its prefill is complete, or it is decoding).
    """

    new_requests: list[NewRequestData] = field(default_factory=list)
    cached_requests: list[CachedRequestData] = field(default_factory=list)
    num_scheduled_tokens: dict[str, int] = field(default_factory=dict)
    finished_req_ids: list[str] = field(default_factory=list)

    @property
    def total_num_scheduled_tokens(self) -> int:
        return sum(self.num_scheduled_tokens.values())

    @property
    def is_empty(self) -> bool:
        return not self.num_scheduled_tokens

    def to_dict(self) -> dict:
        return {"new_requests": self.new_requests,
                "cached_requests": self.cached_requests,
                "num_scheduled_tokens": self.num_scheduled_tokens,
                "finished_req_ids": self.finished_req_ids}

    @classmethod
    def from_dict(cls, data: dict) -> "SchedulerOutput":
        return cls(
            new_requests=list(map(_new_request, data["new_requests"])),
            cached_requests=list(map(_cached_request, data["cached_requests"])),
            num_scheduled_tokens=dict(data["num_scheduled_tokens"]),
            finished_req_ids=list(data["finished_req_ids"]),
        )


class TokenLogprobs(NamedTuple):
    """Log-probabilities at one position: the sampled token's and the top-n alternatives."""

    sampled_logprob: float
    top_token_ids: list[int]
    top_logprobs: list[float]


@dataclass
class ModelRunnerOutput:
    """The tokens sampled in one step, one per request that reached a sampling point."""

    req_ids: list[str] = field(default_factory=list)
    sampled_token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs | None] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"req_ids": self.req_ids, "sampled_token_ids": self.sampled_token_ids,
                "logprobs": self.logprobs}

    @classmethod
    def from_dict(cls, data: dict) -> "ModelRunnerOutput":
        return cls(
            req_ids=list(data["req_ids"]),
            sampled_token_ids=list(data["sampled_token_ids"]),
            logprobs=[lp if lp is None else _token_logprobs(lp) for lp in data["logprobs"]],
        )


# Each builds its record from the wire list without a Python-level call.
_new_request = functools.partial(tuple.__new__, NewRequestData)
_cached_request = functools.partial(tuple.__new__, CachedRequestData)
_token_logprobs = functools.partial(tuple.__new__, TokenLogprobs)

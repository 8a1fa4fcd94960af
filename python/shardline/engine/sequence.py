"""One sequence being generated: its tokens, progress, status and why it stopped.

A request with `n` > 1 becomes `n` sequences that share the prompt; the scheduler and the
workers only ever see sequences, identified by `seq_id`.
"""

from __future__ import annotations

import enum

from shardline.step import PromptLogprobs, TokenLogprobs
from shardline.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self not in (SequenceStatus.WAITING, SequenceStatus.RUNNING)


class Sequence:
    """Engine-side state of one generated sequence (the workers keep their own copy)."""

    def __init__(self, seq_id: str, request_id: str, index: int, prompt_token_ids: list[int],
                 params: SamplingParams, arrival: int, max_len: int,
                 prefix_leader: Sequence | None = None) -> None:
        self.seq_id = seq_id
        self.request_id = request_id
        self.index = index
        self.token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        # Grown one entry per step and shared with the outputs as snapshots, never copied.
        self.output_token_ids: list[int] = []
        self.output_logprobs: list[dict[int, float]] = []
        self.cumulative_logprob = 0.0
        self.params = params
        # The request's prompt logprobs, one entry per prompt token received so far (None
        # for the first): the first sample computes them, the others share its prompt.
        self.prompt_logprobs: list[dict[int, float] | None] | None = (
            [None] if params.prompt_logprobs is not None and index == 0 else None)
        self.arrival = arrival
        self.max_len = max_len
        # A sibling (same prompt, n > 1) whose prompt blocks this one waits to reuse.
        self.prefix_leader = prefix_leader
        self.status = SequenceStatus.WAITING
        self.stop_reason: int | str | None = None
        # Tokens whose KV is in the cache, tokens in steps that have not returned yet, and
        # tokens the workers have been told about.
        self.num_computed_tokens = 0
        self.num_tokens_in_flight = 0
        self.num_tokens_sent = 0
        self.num_blocks_sent = 0
        self.num_cached_tokens = 0
        self.num_preemptions = 0

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[:self.num_prompt_tokens]

    @property
    def is_prefilling(self) -> bool:
        """True until every known token but the newest sampled one has been computed."""
        return self.num_tokens - self.num_computed_tokens > 1 or not self.num_output_tokens

    def append_output(self, token_id: int, logprobs: TokenLogprobs | None) -> None:
        """Record a sampled token; its logprobs are kept only if the request asked for them."""
        self.token_ids.append(token_id)
        self.output_token_ids.append(token_id)
        if self.params.logprobs is None:
            return
        if logprobs is None:
            self.output_logprobs.append({})
            return
        top = dict(zip(logprobs.top_token_ids, logprobs.top_logprobs))
        top[token_id] = logprobs.sampled_logprob
        self.output_logprobs.append(top)
        self.cumulative_logprob += logprobs.sampled_logprob

    @property
    def needs_prompt_logprobs(self) -> bool:
        """Whether some of its prompt logprobs are still to come: until then its prompt is
        computed from the start, never taken from the prefix cache."""
        return (self.prompt_logprobs is not None
                and len(self.prompt_logprobs) < self.num_prompt_tokens)

    def worker_params(self) -> dict:
        """The params as the workers get them: asking for prompt logprobs only while some
        are still to come (a sample that is not the first, or one resumed after they all
        came, does not pay for them again)."""
        params = self.params.to_dict()
        if not self.needs_prompt_logprobs:
            params["prompt_logprobs"] = None
        return params

    def add_prompt_logprobs(self, logprobs: PromptLogprobs) -> None:
        """Record a run of prompt logprobs; those already received (computed again after
        a preemption) are skipped, so each prompt token has one entry."""
        have = len(self.prompt_logprobs)
        if logprobs.first_index > have:
            raise RuntimeError(f"prompt logprobs of {self.seq_id!r} from token "
                               f"{logprobs.first_index} on, but only {have} came before")
        targets = self.token_ids[logprobs.first_index:]
        for i in range(have - logprobs.first_index, len(logprobs.logprobs)):
            entry = dict(zip(logprobs.top_token_ids[i], logprobs.top_logprobs[i]))
            entry[targets[i]] = logprobs.logprobs[i]
            self.prompt_logprobs.append(entry)

    @property
    def finished(self) -> bool:
        return self.status.finished

    @property
    def finish_reason(self) -> str | None:
        return self.status.value if self.finished else None

    def reset_for_recompute(self) -> None:
        """Forget all KV and worker state: the sequence is recomputed from scratch on resume."""
        self.status = SequenceStatus.WAITING
        self.num_computed_tokens = 0
        self.num_tokens_sent = 0
        self.num_blocks_sent = 0
        self.num_preemptions += 1

    def __repr__(self) -> str:
        return (f"Sequence({self.seq_id!r}, status={self.status.name}, tokens={self.num_tokens}, "
                f"computed={self.num_computed_tokens})")

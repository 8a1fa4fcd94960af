"""What the engine returns to callers: one RequestOutput per request, one CompletionOutput
per generated sequence (several when n > 1)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CompletionOutput:
    """One generated sequence so far (cumulative, not a delta).

    `token_ids` include a stop or eos token that ended the sequence; `text` does not, and a
    stop string and everything after it are cut from `text`. `finish_reason` is "stop",
    "length" or "abort" once finished; `stop_reason` is the stop string or stop token id
    that matched (None for eos or length). `logprobs` (when requested) maps, per generated
    token, token id -> log-probability for the top alternatives and the sampled token.
    """

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: list[dict[int, float]] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """A request's prompt and its `n` completions; `finished` once all of them are.

    Every output of one request shares the same `prompt_token_ids` list (it is not copied
    per step): treat it as read-only.
    """

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = False
    num_cached_tokens: int = 0

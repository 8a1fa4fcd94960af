"""The logprobs objects of the server's responses: OpenAI's legacy one (completions), its
chat one, and the `prompt_logprobs` extension, built from the engine's per-token dicts
(token id -> log-probability)."""

from __future__ import annotations

import math
from collections.abc import Sequence

from shardline.engine.outputs import CompletionOutput
from shardline.engine.tokenizer import Tokenizer

# The logprob reported for a token the sampling settings rule out (top_k, top_p, min_p give
# it -inf): JSON has no -Infinity, and this floor is the one vLLM reports.
EXCLUDED_LOGPROB = -9999.0


class Decode:
    """A token's text and bytes for the logprobs objects; without a tokenizer, its id as
    text."""

    def __init__(self, tokenizer: Tokenizer | None) -> None:
        self.tokenizer = tokenizer

    def __call__(self, token: int) -> str:
        if self.tokenizer is None:
            return str(token)
        return self.tokenizer.decode([token], skip_special_tokens=False)

    def bytes(self, token: int) -> bytes:
        if self.tokenizer is None:
            return str(token).encode()
        return self.tokenizer.token_bytes(token)

    def text(self, token_ids: Sequence[int]) -> str:
        """Token ids as text, special tokens included (an echoed prompt given as ids)."""
        if self.tokenizer is None:
            return ""
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=False)


class LegacyLogprobs:
    """OpenAI's legacy logprobs object (`tokens`, `token_logprobs`, `top_logprobs`,
    `text_offset`), grown one run of tokens at a time. `text_offset` is each token's
    offset in the choice's text (the echoed prompt's included), counted in the tokens'
    own texts as vLLM counts them. Alternatives are keyed by text, and tokens can share one
    (bytes of a split character all read U+FFFD): the most likely of them keeps the key.
    A prompt's first token has no logprob: None, with None for its alternatives."""

    def __init__(self, decode: Decode) -> None:
        self.decode = decode
        self.offset = 0

    def add(self, token_ids: Sequence[int], entries: Sequence[dict[int, float] | None],
            top_n: int | None = None) -> dict:
        """The object for these tokens, offsets going on from the last run's; `top_n`
        keeps only the n most likely alternatives (and the token's own)."""
        tokens, sampled, top, offsets = [], [], [], []
        for token, alternatives in zip(token_ids, entries):
            text = self.decode(token)
            tokens.append(text)
            offsets.append(self.offset)
            self.offset += len(text)
            if alternatives is None:
                sampled.append(None)
                top.append(None)
                continue
            sampled.append(_finite(alternatives.get(token)))
            ranked: dict[str, float] = {}
            for t, lp in _ranked(alternatives, top_n, token):
                ranked.setdefault(self.decode(t), lp)
            top.append(ranked)
        return {"tokens": tokens, "token_logprobs": sampled, "top_logprobs": top,
                "text_offset": offsets}


def chat_logprobs(completion: CompletionOutput, decode: Decode, top_n: int,
                  start: int = 0) -> dict:
    """OpenAI's chat logprobs object (`content`, one entry per token) from `start` on."""
    content = []
    for token, alternatives in zip(completion.token_ids[start:], completion.logprobs[start:]):
        text = decode(token)
        content.append({"token": text, "logprob": _finite(alternatives.get(token)),
                        "bytes": list(decode.bytes(token)),
                        "top_logprobs": [{"token": decode(t), "logprob": lp,
                                          "bytes": list(decode.bytes(t))}
                                         for t, lp in _ranked(alternatives)[:top_n]]})
    return {"content": content}


def prompt_logprobs(entries: Sequence[dict[int, float] | None], token_ids: Sequence[int],
                    decode: Decode, top_n: int) -> list:
    """The `prompt_logprobs` extension, as vLLM gives it: per prompt token None (the
    first) or, keyed by token id, the logprob and text of the token and of the `top_n`
    most likely there."""
    return [None if entry is None else
            {str(t): {"logprob": lp, "decoded_token": decode(t)}
             for t, lp in _ranked(entry, top_n, token)}
            for token, entry in zip(token_ids, entries)]


def _ranked(alternatives: dict[int, float], top_n: int | None = None,
            keep: int | None = None) -> list[tuple[int, float]]:
    """(token, logprob) from the most likely down, every logprob finite: the `top_n` most
    likely (all if None) and `keep` wherever it ranks."""
    ranked = sorted(alternatives.items(), key=lambda item: -item[1])
    if top_n is not None:
        ranked = [item for i, item in enumerate(ranked) if i < top_n or item[0] == keep]
    return [(token, _finite(logprob)) for token, logprob in ranked]


def _finite(logprob: float | None) -> float | None:
    return EXCLUDED_LOGPROB if logprob == -math.inf else logprob

"""What the engine takes as a prompt: text, a list of token ids, or vLLM's dict forms of
either (TextPrompt, TokensPrompt), so that code written for vLLM runs unchanged.

    llm.generate({"prompt": "The sky is"})                 # as "The sky is"
    llm.generate({"prompt_token_ids": [1, 415, 7212]})     # as [1, 415, 7212]
    llm.generate({"prompt_token_ids": ids, "prompt": s})   # runs ids; reports s as the prompt

A dict with another key (vLLM's multi_modal_data, mm_processor_kwargs, cache_salt, ...) is
refused, never run without it: the request would not be the one asked for.
"""

from __future__ import annotations

import collections.abc
import reprlib
from typing import Sequence as Seq, TypedDict, Union

from shardline.engine.request_checks import is_sequence


class TextPrompt(TypedDict):
    """A prompt as text, vLLM's TextPrompt: `{"prompt": "Hello"}` is the request "Hello"."""

    prompt: str


class _TokenIds(TypedDict):
    prompt_token_ids: list[int]


class TokensPrompt(_TokenIds, total=False):
    """A prompt as token ids, vLLM's TokensPrompt: `{"prompt_token_ids": [1, 2]}` is the
    request [1, 2]. An optional "prompt" is the text the ids came from: it is not
    tokenized, only reported as RequestOutput.prompt."""

    prompt: str


PromptType = Union[str, Seq[int], TextPrompt, TokensPrompt]

PROMPT_KEYS = ("prompt", "prompt_token_ids")
_WHAT = ("a string, a list of token ids, or a dict with 'prompt' (text) and/or "
         "'prompt_token_ids' (token ids)")


def parse_prompt(prompt: object) -> tuple[str | None, str | Seq[int]]:
    """(the text RequestOutput.prompt reports, what to run: text to tokenize or token ids)
    for a prompt, or a ValueError naming what is wrong with it. The token ids are returned
    as given; the engine checks them against the vocabulary."""
    if isinstance(prompt, str):
        return prompt, prompt
    if is_sequence(prompt):
        return None, prompt
    if not isinstance(prompt, collections.abc.Mapping):
        raise ValueError(f"{_described(prompt)} is not a prompt: pass {_WHAT}")
    unknown = [key for key in prompt if key not in PROMPT_KEYS]
    if unknown:
        names = ", ".join(repr(key) for key in unknown)
        raise ValueError(f"{_described(prompt)} is not a prompt: it has the "
                         f"key{'s' if len(unknown) > 1 else ''} {names}, which shardline does "
                         "not take (it has no multi-modal inputs, processor options or cache "
                         "salts); a prompt dict holds only 'prompt' (text) and/or "
                         "'prompt_token_ids' (token ids)")
    text = prompt.get("prompt")
    if "prompt" in prompt and not isinstance(text, str):
        raise ValueError(f"prompt['prompt']={reprlib.repr(text)} ({type(text).__name__}) is "
                         "not text: 'prompt' must be a string")
    if "prompt_token_ids" in prompt:
        ids = prompt["prompt_token_ids"]
        if not is_sequence(ids):   # text here must not be tokenized as a text prompt is
            raise ValueError(f"prompt['prompt_token_ids']={reprlib.repr(ids)} "
                             f"({type(ids).__name__}) is not a list of token ids")
        return text, ids
    if text is None:
        raise ValueError(f"{_described(prompt)} is not a prompt: it has neither 'prompt' nor "
                         "'prompt_token_ids'; pass {'prompt': text} or "
                         "{'prompt_token_ids': [token ids]}")
    return text, text


def token_ids_name(prompt: object) -> str:
    """How errors name a prompt's token ids: `prompt`, or the dict's key."""
    return "prompt['prompt_token_ids']" if isinstance(prompt, collections.abc.Mapping) \
        else "prompt"


def _described(prompt: object) -> str:
    return f"prompt={reprlib.repr(prompt)} ({type(prompt).__name__})"

"""What a request must be before the engine takes it: its id, its token ids and the parts of
its SamplingParams that depend on the model or the engine (SamplingParams checks the rest
on its own). Each check raises a ValueError naming the field, the value and the rule."""

from __future__ import annotations

import collections.abc
import operator
import reprlib

from shardline.sampling_params import SamplingParams


def is_sequence(values: object) -> bool:
    """A list, tuple or other sequence that is not text or bytes: what holds prompts,
    token ids or per-prompt params."""
    return (isinstance(values, collections.abc.Sequence)
            and not isinstance(values, (str, bytes, bytearray, memoryview)))


def check_request_id(request_id: object) -> None:
    """Refuse a request id that is not a string. Each step carries the ids to the workers
    through msgpack, which gives a tuple back as a list (unhashable, so the engine could not
    look the request up): the step would fail, and with it the engine. Any str travels,
    lone surrogates included."""
    if not isinstance(request_id, str):
        raise ValueError(f"request_id={reprlib.repr(request_id)} "
                         f"({type(request_id).__name__}) is invalid: must be a string")


def token_ids(values: object, where: str, vocab_size: int) -> list[int]:
    """`values` as plain ints, each an id of a vocabulary of `vocab_size`, or a ValueError
    naming `where`.

    `values` must be a sequence such as a list: bytes iterate as integers and a bool
    indexes as one, but neither holds token ids.
    """
    if not is_sequence(values):
        raise ValueError(f"{where}={reprlib.repr(values)} ({type(values).__name__}) is "
                         "not a list of token ids")
    ids = []
    for i, value in enumerate(values):
        if isinstance(value, bool):
            raise ValueError(f"{where}[{i}]={value!r} is not a token id: token ids are "
                             "integers, not bools")
        try:
            token = operator.index(value)
        except TypeError:
            raise ValueError(f"{where}[{i}]={value!r} is not a token id: token ids are "
                             "integers") from None
        if not 0 <= token < vocab_size:
            raise ValueError(f"{where}[{i}]={token} is outside the vocabulary "
                             f"[0, {vocab_size})")
        ids.append(token)
    return ids


def check_logprobs(params: SamplingParams, vocab_size: int, max_logprobs: int) -> None:
    """Refuse a top-n of logprobs or prompt_logprobs beyond the vocabulary or the engine's
    `max_logprobs` (ModelConfig; -1: no bound but the vocabulary): each position's n
    entries stay in the engine's memory, and a whole distribution is tens of thousands of
    entries a token for a real model."""
    for name in ("logprobs", "prompt_logprobs"):
        value = getattr(params, name)
        if value is None:
            continue
        if value > vocab_size:
            raise ValueError(f"SamplingParams.{name}={value} is invalid: must be None or "
                             f"at most {vocab_size}, the model's vocabulary size")
        if max_logprobs != -1 and value > max_logprobs:
            raise ValueError(f"SamplingParams.{name}={value} is invalid: must be None or "
                             f"at most {max_logprobs}, the engine's max_logprobs (pass a "
                             "larger max_logprobs, or -1, when creating the engine)")


def check_min_tokens(params: SamplingParams, eos_token_ids: collections.abc.Set[int],
                     vocab_size: int) -> None:
    """Refuse min_tokens when the tokens it masks (the stop token ids and, unless ignored,
    the eos tokens) are the whole vocabulary: nothing would be left to draw (the sampler
    took token 0, a stop token, with NaN logprobs). The same when they hold every one of
    the allowed_token_ids."""
    if not params.min_tokens:
        return
    masked = set(params.stop_token_ids)
    if not params.ignore_eos:
        masked |= eos_token_ids
    if params.allowed_token_ids is not None and masked.issuperset(params.allowed_token_ids):
        raise ValueError(f"SamplingParams.min_tokens={params.min_tokens} is invalid: short "
                         "of it the stop_token_ids" + ("" if params.ignore_eos else
                                                       " and the eos tokens")
                         + " are masked, and they include every one of allowed_token_ids="
                         f"{reprlib.repr(params.allowed_token_ids)}, leaving none to sample: "
                         "allow a token that does not stop the sequence, or min_tokens=0")
    if len({t for t in masked if 0 <= t < vocab_size}) == vocab_size:
        raise ValueError(f"SamplingParams.min_tokens={params.min_tokens} is invalid: short "
                         "of it the stop_token_ids" + ("" if params.ignore_eos else
                                                       " and the eos tokens")
                         + f" are masked, and they are all {vocab_size} tokens of the "
                         "vocabulary, leaving none to sample: use fewer stop_token_ids "
                         "or min_tokens=0")


def check_vocabulary_fields(params: SamplingParams, vocab_size: int) -> None:
    """Refuse logit_bias keys and allowed_token_ids outside the vocabulary: the sampler
    indexes the logits with them, and an index past the vocabulary would fail the step,
    and with it the engine."""
    for token, bias in (params.logit_bias or {}).items():
        if token >= vocab_size:
            raise ValueError(f"SamplingParams.logit_bias[{token}]={bias} is invalid: token "
                             f"id {token} is outside the vocabulary [0, {vocab_size})")
    if params.allowed_token_ids is not None:
        token_ids(params.allowed_token_ids, "allowed_token_ids", vocab_size)

"""Random combinations of request settings on tiny-llama (fp32, CPU): extreme and edge
values of every SamplingParams field together, in prompts of every form and length, mixed
in one `generate` and in the incremental API (requests added and aborted between steps).

The contract: each combination is refused with a ValueError naming the field at once
(building the params, or adding the request), or it runs to the end with well-formed
outputs: n completions, token ids in the vocabulary, finite logprobs of drawn tokens, as
many tokens as max_tokens, min_tokens and the stop conditions allow. And the engine keeps
serving: it ends idle, every KV block free, and answers the next request. The engine
takes every scheduling path at once: async scheduling, chunked prefill on a budget of a
few tokens, a KV cache small enough to preempt, and the prefix cache.
"""

from __future__ import annotations

import math
import random

import pytest

from fake_engine_checks import assert_all_free
from shardline import LLM, SamplingParams
from shardline.sampling_params import InvalidSamplingParam

ENGINE = dict(block_size=4, num_kv_blocks=16, max_model_len=32, max_num_seqs=8,
              max_num_batched_tokens=8, async_scheduling=True, enable_prefix_caching=True)
COMBINATIONS = 40
# Stop strings: odd characters, the empty string (refused) and a lone surrogate.
ODD_TEXT = ["\x00", "\ufffd", "\u00e9", "\U0001F600", "a", " ", "\n", "e\u0301", "\u200b",
            "\ud800", "", "=", "zz"]


@pytest.fixture(scope="module")
def llm():
    return LLM("tiny-llama", **ENGINE)


def edge_value(rng: random.Random, name: str, vocab: int, max_len: int, kwargs: dict,
               invalid: bool) -> object:
    """An edge value of one SamplingParams field, now and then (when `invalid`) one that
    SamplingParams or the engine must refuse."""
    def pick(good: list, bad: list) -> object:
        return rng.choice(bad if invalid and bad and rng.random() < 0.4 else good)
    some_ids = [rng.randrange(vocab) for _ in range(rng.randint(1, 5))]
    max_tokens = kwargs.get("max_tokens", 16)
    return {
        "n": lambda: pick([1, 1, 2, 3, 8], [0, 4097]),
        "temperature": lambda: pick([0.0, 1e-5, 1.0, 1e4], [1e-8, -1.0, math.nan]),
        "top_k": lambda: pick([-1, 1, vocab, vocab + 1, 2**63 - 1], [0]),
        "top_p": lambda: pick([1e-9, 5e-324, 0.5, 1.0], [0.0]),
        "min_p": lambda: pick([0.0, 1e-9, 0.999, 1.0], [1.1]),
        "seed": lambda: pick([None, 0, -2**63, 2**63 - 1, 2**64 - 9], [2**64]),
        "repetition_penalty": lambda: pick([1e-5, 1.0, 1.3, 1e5], [0.0]),
        "presence_penalty": lambda: pick([-2.0, 0.0, 2.0], [2.5]),
        "frequency_penalty": lambda: pick([-2.0, 0.0, 2.0], [-3]),
        "max_tokens": lambda: pick([None, 1, 2, 7, max_len - 1, 2**63 - 1], [0]),
        "min_tokens": lambda: pick([0, 1, max_tokens if max_tokens else 3], [2**63 - 1]),
        "stop_token_ids": lambda: pick([[2], [0], some_ids, list(range(vocab - 1))],
                                       [[vocab], list(range(vocab))]),
        "stop": lambda: [rng.choice(ODD_TEXT[:9] + ODD_TEXT[-2:] if not invalid else ODD_TEXT)
                         for _ in range(rng.randint(1, 3))],
        "ignore_eos": lambda: rng.random() < 0.5,
        "logprobs": lambda: pick([0, 1, 20], [21, -1]),
        "prompt_logprobs": lambda: pick([0, 1, 20], [vocab + 1]),
        "skip_special_tokens": lambda: rng.random() < 0.5,
        "logit_bias": lambda: pick([{t: rng.choice([-100.0, -1e-30, 5.5, 100.0])
                                     for t in some_ids}], [{vocab: 1.0}, {0: 100.5}]),
        "allowed_token_ids": lambda: pick([some_ids, [2], list(range(vocab))], [[vocab], []]),
    }[name]()


FIELDS = ("n", "temperature", "top_k", "top_p", "min_p", "seed", "repetition_penalty",
          "presence_penalty", "frequency_penalty", "max_tokens", "min_tokens",
          "stop_token_ids", "stop", "ignore_eos", "logprobs", "prompt_logprobs",
          "skip_special_tokens", "logit_bias", "allowed_token_ids")


def random_kwargs(rng: random.Random, vocab: int, max_len: int) -> dict:
    """A random half of the fields, at edge values; a quarter of the sets may hold invalid
    ones."""
    invalid = rng.random() < 0.25
    kwargs: dict = {}
    for name in FIELDS:
        if rng.random() < 0.5:
            kwargs[name] = edge_value(rng, name, vocab, max_len, kwargs, invalid)
    return kwargs


def random_prompt(rng: random.Random, vocab: int, max_len: int) -> object:
    """Text or token ids of 1 to max_model_len tokens, bare or in vLLM's dict forms."""
    length = rng.choice([1, 2, rng.randint(1, max_len - 1), max_len - 1, max_len])
    if rng.random() < 0.5:
        prompt: object = [rng.randrange(vocab) for _ in range(length)]
        key = "prompt_token_ids"
    else:   # the byte-level tokenizer: ASCII characters are one token each
        prompt = "".join(chr(rng.randrange(32, 127)) for _ in range(length))
        key = "prompt"
    return {key: prompt} if rng.random() < 0.3 else prompt


def check_completed(output, params: SamplingParams, vocab: int, eos: set[int],
                    max_len: int) -> None:
    """The contract for a request that ran to its end (or was aborted)."""
    prompt_len = len(output.prompt_token_ids)
    assert output.finished and len(output.outputs) == params.n
    assert sorted(c.index for c in output.outputs) == list(range(params.n))
    for completion in output.outputs:
        tokens = list(completion.token_ids)
        assert all(0 <= t < vocab for t in tokens), tokens
        if params.allowed_token_ids is not None:
            assert set(tokens) <= set(params.allowed_token_ids), tokens
        reason = completion.finish_reason
        if reason == "abort":
            continue
        assert tokens and (params.max_tokens is None or len(tokens) <= params.max_tokens)
        # A prompt of max_model_len tokens still gets its one token (as in vLLM).
        assert prompt_len + len(tokens) <= max(max_len, prompt_len + 1)
        masked = set(params.stop_token_ids) | (set() if params.ignore_eos else eos)
        assert not masked & set(tokens[:params.min_tokens - 1]), (tokens, params.min_tokens)
        if reason == "length":
            assert len(tokens) == params.max_tokens or prompt_len + len(tokens) >= max_len
        else:
            assert reason == "stop" and len(tokens) >= params.min_tokens, (reason, tokens)
            stop = completion.stop_reason
            assert (stop in params.stop if isinstance(stop, str)
                    else tokens[-1] == stop if stop is not None else tokens[-1] in eos)
        if params.logprobs is None:
            assert completion.logprobs is None
            continue
        assert len(completion.logprobs) == len(tokens)
        for token, entry in zip(tokens, completion.logprobs):
            assert math.isfinite(entry[token]) and entry[token] <= 0.0, (token, entry)
            assert len(entry) <= params.logprobs + 1
            assert all(0 <= t < vocab and not math.isnan(v) for t, v in entry.items())
    if params.prompt_logprobs is not None:
        entries = list(output.prompt_logprobs)
        # An abort may come before the prompt is all computed.
        aborted = output.outputs[0].finish_reason == "abort"
        assert (len(entries) <= prompt_len if aborted else len(entries) == prompt_len)
        assert entries[0] is None
        for token, entry in zip(output.prompt_token_ids[1:], entries[1:]):
            assert math.isfinite(entry[token]) and entry[token] <= 0.0, (token, entry)


def accepted(llm: LLM, rng: random.Random, count: int) -> list[tuple[object, SamplingParams]]:
    """`count` random (prompt, params) pairs, of which those refused are checked to name
    what they refuse, and dropped."""
    engine = llm.engine
    pairs = []
    for _ in range(count):
        kwargs = random_kwargs(rng, engine.vocab_size, engine.max_model_len)
        try:
            params = SamplingParams(**kwargs)
        except InvalidSamplingParam as exc:
            assert exc.name in kwargs and f"SamplingParams.{exc.name}" in str(exc), exc
            continue
        prompt = random_prompt(rng, engine.vocab_size, engine.max_model_len)
        try:
            engine.encode_prompt(prompt, params)
        except ValueError as exc:
            assert any(name in str(exc) for name in (*kwargs, "prompt")), (exc, kwargs)
            continue
        pairs.append((prompt, params))
    return pairs


def test_random_request_combinations_finish_well_formed_or_are_refused(llm, rng):
    engine = llm.engine
    vocab, max_len, eos = engine.vocab_size, engine.max_model_len, engine.outputs.eos_token_ids
    pairs = accepted(llm, rng, COMBINATIONS)
    half = len(pairs) // 2
    # One generate call of many combinations at once.
    outputs = llm.generate([p for p, _ in pairs[:half]], [s for _, s in pairs[:half]])
    for (_, params), output in zip(pairs[:half], outputs):
        check_completed(output, params, vocab, eos, max_len)
    # The rest through add_request / step / abort_request, arriving at random steps.
    pending = {f"fuzz-{i}": pair for i, pair in enumerate(pairs[half:])}
    to_add, live = list(pending), set()
    while to_add or llm.has_unfinished_requests():
        if to_add and (not live or rng.random() < 0.4):
            request_id = to_add.pop()
            llm.add_request(request_id, *pending[request_id])
            live.add(request_id)
        finished = [o for o in llm.step() if o.finished]
        if live and rng.random() < 0.1:
            request_id = rng.choice(sorted(live))
            aborted = llm.abort_request(request_id)
            finished += [aborted] if aborted is not None else []
        for output in finished:
            live.discard(output.request_id)
            check_completed(output, pending[output.request_id][1], vocab, eos, max_len)
    assert not live
    llm.engine.collect_idle_steps()
    assert_all_free(engine)
    # And it keeps serving.
    (after,) = llm.generate([[5, 6, 7]], SamplingParams(temperature=0.0, max_tokens=3,
                                                        ignore_eos=True))
    assert len(after.outputs[0].token_ids) == 3

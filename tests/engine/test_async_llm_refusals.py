"""AsyncLLM over the checking fake worker refuses bad input with a ValueError for that stream
alone, and the engine keeps serving the others: prompts and params of the wrong type, bad
prompt token ids, a request id in use or not a string. Every wait is bounded."""

import asyncio

import pytest

from async_llm_helpers import (TIMEOUT, StepGate, collect, greedy, random_prompt,
                               reference_tokens, wait_idle)
from fake_engine_checks import assert_all_free
from fake_model import VOCAB, make_engine
from shardline.engine.async_llm import AsyncLLM


@pytest.mark.parametrize("prompt, params, message", [
    (None, None, r"prompt=None"),
    (7, None, r"prompt=7"),
    ({1: 2}, None, r"prompt=\{1: 2\}"),
    (b"\x01\x02", None, r"prompt=b'\\x01\\x02'"),
    ([True, False], None, r"prompt\[0\]=True is not a token id"),
    ([1, 2], 7, r"sampling_params=7"),
    ([1, 2], {"max_tokens": 3}, r"sampling_params=\{'max_tokens': 3\}"),
])
def test_bad_prompt_or_params_type_raises_value_error(rng, prompt, params, message):
    engine = make_engine()
    llm = AsyncLLM.from_engine(engine)
    good_prompt = random_prompt(rng)

    async def main():
        good = asyncio.create_task(collect(llm.generate(good_prompt, greedy(6), "good")))
        with pytest.raises(ValueError, match=message):
            await asyncio.wait_for(collect(llm.generate(prompt, params, "bad")), TIMEOUT)
        return await asyncio.wait_for(good, TIMEOUT)

    outputs = asyncio.run(main())
    assert outputs[-1].outputs[0].token_ids == reference_tokens(good_prompt, greedy(6))
    wait_idle(engine)
    assert_all_free(engine)


def test_bad_prompt_token_ids_fail_their_stream_alone(rng):
    """The ids a caller passes with its prompt went to the workers unchecked: one out of
    the vocabulary failed the step (IndexError in the embedding) and stopped the engine
    for every stream; so did a prompt longer than max_model_len, or params of the wrong
    type."""
    engine = make_engine(max_model_len=64)
    llm = AsyncLLM.from_engine(engine)
    good = random_prompt(rng)
    spot = rng.randrange(len(good))
    bad_cases = [
        (good[:spot] + [VOCAB + rng.randint(0, 10**9)] + good[spot:], None,
         rf"prompt_token_ids\[{spot}\]=\d+ is outside the vocabulary"),
        (good[:spot] + [-rng.randint(1, 10**9)] + good[spot:], None, "outside the vocabulary"),
        (good[:spot] + [True] + good[spot:], None, rf"prompt_token_ids\[{spot}\]=True is not"),
        (good[:spot] + [1.0] + good[spot:], None, rf"prompt_token_ids\[{spot}\]=1.0 is not"),
        ([], None, "prompt is empty"),
        ("abc", None, "not a list of token ids"),
        ([rng.randrange(VOCAB) for _ in range(rng.randint(65, 200))], None,
         "longer than max_model_len=64"),
        (good, {"temperature": 0}, r"sampling_params=\{'temperature': 0\} \(dict\) is not a "
                                   "SamplingParams"),
    ]

    async def main():
        for ids, params, message in rng.sample(bad_cases, len(bad_cases)):
            with pytest.raises(ValueError, match=message):
                await asyncio.wait_for(collect(llm.generate("", params, "bad",
                                                            prompt_token_ids=ids)), TIMEOUT)
        outputs = await asyncio.wait_for(collect(llm.generate(
            "", greedy(8), "good", prompt_token_ids=tuple(good))), TIMEOUT)
        assert outputs[-1].outputs[0].token_ids == reference_tokens(good, greedy(8))

    asyncio.run(main())
    wait_idle(engine)
    assert_all_free(engine)


def test_duplicate_request_id_fails_the_newcomer_only(rng, monkeypatch):
    engine = make_engine()
    gate = StepGate(engine, monkeypatch)
    llm = AsyncLLM.from_engine(engine)
    prompt = random_prompt(rng)
    gate.hold(at_step=1)

    async def main():
        first = llm.generate(prompt, greedy(20), "dup")
        head = await asyncio.wait_for(first.__anext__(), TIMEOUT)
        await gate.held()
        duplicate = asyncio.create_task(collect(llm.generate(prompt, greedy(5), "dup")))
        await asyncio.sleep(0.01)
        gate.release.set()
        with pytest.raises(ValueError, match="already in use"):
            await asyncio.wait_for(duplicate, TIMEOUT)
        return [head] + await asyncio.wait_for(collect(first), TIMEOUT)

    outputs = asyncio.run(main())
    assert outputs[-1].outputs[0].token_ids == reference_tokens(prompt, greedy(20))
    wait_idle(engine)
    assert_all_free(engine)


def test_request_id_must_be_a_string(rng):
    llm = AsyncLLM.from_engine(make_engine())

    async def main():
        with pytest.raises(ValueError, match=r"request_id=\['x'\] \(list\) is not a string"):
            await asyncio.wait_for(collect(llm.generate(random_prompt(rng), None, ["x"])), TIMEOUT)

    asyncio.run(main())

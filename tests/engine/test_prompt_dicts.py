"""Prompts as vLLM's dicts: a TextPrompt {"prompt": text} runs as its text and a TokensPrompt
{"prompt_token_ids": ids} as its ids (with "prompt" too: the ids run, the text is reported),
with the same greedy tokens, RequestOutput.prompt and prompt_token_ids as the plain form, in
LLM.generate (one prompt, lists, mixed lists), AsyncLLM.generate, LLMEngine.add_request, the
data-parallel front end and the multi-process executor. A malformed dict (another key, no
key, a wrong type under a key) is refused with a message naming it and the prompt's index,
before anything of the call runs.

The equivalence runs on tiny-llama (real tokenizer, real worker; prefix caching off, so that
the same batch twice is the same arithmetic), the rest over the checking fake worker.
"""

import asyncio
import contextlib
import random

import pytest

from engine_prompts import random_prompt
from fake_engine_checks import assert_all_free
from fake_model import VOCAB, make_engine, run_to_the_end
from near_ties import assert_greedy_match, outputs_run
from shardline import LLM, AsyncLLM, SamplingParams, TextPrompt, TokensPrompt
from shardline.engine.data_parallel import DataParallelEngine

MODEL = "tiny-llama"
GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
# Letters, digits, punctuation, and characters of two to four UTF-8 bytes.
TEXT_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,;!?'-" \
             "éüßçøñ€中文語🙂"
TIMEOUT_S = 60.0


def random_text(rng: random.Random, chars: str = TEXT_CHARS, high: int = 30) -> str:
    return "".join(rng.choice(chars) for _ in range(rng.randint(1, high)))


def outcome(outputs) -> list[tuple]:
    """What a prompt's form must not change: the reported prompt, its token ids, the
    generated tokens."""
    return [(o.prompt, list(o.prompt_token_ids), list(o.outputs[0].token_ids))
            for o in outputs]


def random_forms(rng: random.Random, texts: list[str], ids: list[list[int]]
                 ) -> tuple[list, list, list[str | None]]:
    """Each prompt, text or ids, in its plain form and in a random dict form, and the text
    its output reports: the dict's "prompt" where it gives one with ids, else the plain
    form's."""
    plain, dicts, reported = [], [], []
    for prompt in texts + ids:
        plain.append(prompt)
        if isinstance(prompt, str):
            dicts.append(rng.choice([{"prompt": prompt}, TextPrompt(prompt=prompt)]))
            reported.append(prompt)
        elif rng.random() < 0.5:
            dicts.append(TokensPrompt(prompt_token_ids=prompt))
            reported.append(None)
        else:
            reported.append(random_text(rng))
            dicts.append({"prompt": reported[-1], "prompt_token_ids": prompt})
    order = list(range(len(plain)))
    rng.shuffle(order)
    return ([plain[i] for i in order], [dicts[i] for i in order],
            [reported[i] for i in order])


def with_prompts(expected: list[tuple], reported: list[str | None]) -> list[tuple]:
    return [(text, ids, tokens) for text, (_, ids, tokens) in zip(reported, expected)]


@pytest.fixture(scope="module")
def llm():
    llm = LLM(MODEL, block_size=4, num_kv_blocks=256, enable_prefix_caching=False)
    yield llm
    llm.shutdown()


def test_a_text_prompt_runs_as_its_text(llm, rng):
    texts = [random_text(rng) for _ in range(rng.randint(2, 6))]
    plain = llm.generate(texts, GREEDY)
    assert [o.prompt for o in plain] == texts
    assert outcome(llm.generate([{"prompt": t} for t in texts], GREEDY)) == outcome(plain)
    one = rng.choice(texts)
    assert outcome(llm.generate(TextPrompt(prompt=one), GREEDY)) == \
        outcome(llm.generate(one, GREEDY))
    assert_all_free(llm.engine)


def test_a_tokens_prompt_runs_as_its_ids_and_reports_its_text(llm, rng):
    ids = [random_prompt(rng, 1, 30) for _ in range(rng.randint(2, 6))]
    plain = llm.generate(ids, GREEDY)
    assert all(o.prompt is None for o in plain)
    bare = llm.generate([TokensPrompt(prompt_token_ids=p) for p in ids], GREEDY)
    assert outcome(bare) == outcome(plain)
    texts = [random_text(rng) for _ in ids]
    labelled = llm.generate([{"prompt_token_ids": p, "prompt": t} for p, t in zip(ids, texts)],
                            GREEDY)
    assert outcome(labelled) == with_prompts(outcome(plain), texts)
    one = rng.choice(ids)
    assert outcome(llm.generate({"prompt_token_ids": one}, GREEDY)) == \
        outcome(llm.generate(one, GREEDY))


def test_a_mixed_list_runs_as_its_plain_forms(llm, rng):
    texts = [random_text(rng) for _ in range(rng.randint(1, 4))]
    ids = [random_prompt(rng, 1, 30) for _ in range(rng.randint(1, 4))]
    plain, dicts, reported = random_forms(rng, texts, ids)
    mixed, mixed_reported = [], []
    for prompt, as_dict, text in zip(plain, dicts, reported):
        use_dict = rng.random() < 0.5
        mixed.append(as_dict if use_dict else prompt)
        mixed_reported.append(text if use_dict else
                              prompt if isinstance(prompt, str) else None)
    expected = outcome(llm.generate(plain, GREEDY))
    assert outcome(llm.generate(mixed, GREEDY)) == with_prompts(expected, mixed_reported)
    assert_all_free(llm.engine)


def fake_engine_case(rng):
    """Random prompts on the fake engine: their dict forms, the prompts those report, and
    the plain forms' outcome on one engine."""
    texts = [random_text(rng, "abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(1, 4))]
    ids = [[rng.randrange(VOCAB) for _ in range(rng.randint(1, 30))]
           for _ in range(rng.randint(1, 4))]
    plain, dicts, reported = random_forms(rng, texts, ids)
    return dicts, reported, outcome(LLM.from_engine(make_engine()).generate(plain, GREEDY))


def test_engine_add_request_and_the_data_parallel_front_end_take_dicts(rng):
    dicts, reported, expected = fake_engine_case(rng)
    finished = run_to_the_end(make_engine(), dicts, [GREEDY] * len(dicts))
    assert outcome(finished[f"r{i}"] for i in range(len(dicts))) == \
        with_prompts(expected, reported)
    data_parallel = DataParallelEngine([make_engine(), make_engine()])
    assert outcome(LLM.from_engine(data_parallel).generate(dicts, GREEDY)) == \
        with_prompts(expected, reported)
    for core in data_parallel.cores:
        assert_all_free(core)


def test_async_llm_streams_dicts_as_their_plain_forms(rng):
    dicts, reported, expected = fake_engine_case(rng)
    engine = make_engine()
    async_llm = AsyncLLM.from_engine(engine)

    async def final(i: int, given_ids: bool):
        # With prompt_token_ids given (as a server passes them), the dict still names the text.
        token_ids = engine.encode_prompt(dicts[i], GREEDY)[1] if given_ids else None
        async with contextlib.aclosing(async_llm.generate(dicts[i], GREEDY, f"s{i}",
                                                          token_ids)) as stream:
            return [output async for output in stream][-1]

    async def main(given_ids: bool) -> list:
        return await asyncio.wait_for(
            asyncio.gather(*(final(i, given_ids) for i in range(len(dicts)))), TIMEOUT_S)

    for given_ids in (False, True):
        assert outcome(asyncio.run(main(given_ids))) == with_prompts(expected, reported)
    assert_all_free(engine)
    async_llm.shutdown()


REFUSALS = [
    ({"prompt": "abc", "multi_modal_data": {"image": None}},
     ["is not a prompt: it has the key 'multi_modal_data', which shardline does not take",
      "a prompt dict holds only 'prompt' (text) and/or 'prompt_token_ids' (token ids)"]),
    ({"prompt_token_ids": [1, 2], "mm_processor_kwargs": {}, "cache_salt": "s"},
     ["it has the keys 'mm_processor_kwargs', 'cache_salt', which shardline does not take"]),
    ({}, ["prompt={} (dict) is not a prompt: it has neither 'prompt' nor 'prompt_token_ids'"]),
    ({"prompt": 5}, ["prompt['prompt']=5 (int) is not text: 'prompt' must be a string"]),
    ({"prompt": None}, ["prompt['prompt']=None (NoneType) is not text"]),
    ({"prompt_token_ids": [3, 4], "prompt": [3, 4]},
     ["prompt['prompt']=[3, 4] (list) is not text"]),
    ({"prompt_token_ids": "abc"},
     ["prompt['prompt_token_ids']='abc' (str) is not a list of token ids"]),
    ({"prompt_token_ids": [1, VOCAB]},
     [f"prompt['prompt_token_ids'][1]={VOCAB} is outside the vocabulary [0, {VOCAB})"]),
    ({"prompt_token_ids": [2, True]}, ["prompt['prompt_token_ids'][1]=True is not a token id"]),
    ({"prompt_token_ids": []}, ["prompt is empty"]),
]


@pytest.mark.parametrize("bad, fragments", REFUSALS)
def test_a_malformed_dict_refuses_the_call_before_anything_runs(rng, bad, fragments):
    engine = make_engine()
    llm = LLM.from_engine(engine)
    good = [rng.choice([random_text(rng, "abcdefghijklmnopqrstuvwxyz"),
                        {"prompt_token_ids": [rng.randrange(VOCAB) for _ in range(5)]}])
            for _ in range(rng.randint(1, 5))]
    index = rng.randint(0, len(good))
    prompts = good[:index] + [bad] + good[index:]
    for call, where in [(lambda: llm.generate(prompts, GREEDY), f"prompt {index}: "),
                        (lambda: llm.generate(bad, GREEDY), "prompt 0: "),
                        (lambda: engine.add_request("bad", bad, GREEDY), "")]:
        with pytest.raises(ValueError) as refused:
            call()
        message = str(refused.value)
        assert message.startswith(where), message
        assert all(fragment in message for fragment in fragments), message
    assert engine.executor.steps == []
    assert_all_free(engine)

    async def stream() -> None:
        async for _ in AsyncLLM.from_engine(engine).generate(bad, GREEDY, "bad"):
            pass
    with pytest.raises(ValueError) as refused:
        asyncio.run(stream())
    assert all(fragment in str(refused.value) for fragment in fragments), str(refused.value)
    assert engine.executor.steps == []


def test_a_bad_key_is_refused_also_with_the_token_ids_given(rng):
    """AsyncLLM.generate with prompt_token_ids (a server's call) checks the dict on the
    engine thread: the stream alone fails."""
    engine = make_engine()
    async_llm = AsyncLLM.from_engine(engine)
    ids = [rng.randrange(VOCAB) for _ in range(rng.randint(1, 20))]

    async def stream() -> None:
        bad = {"prompt_token_ids": ids, "cache_salt": random_text(rng)}
        async for _ in async_llm.generate(bad, GREEDY, "bad", prompt_token_ids=ids):
            pass
    with pytest.raises(ValueError, match="it has the key 'cache_salt'"):
        asyncio.run(stream())
    async_llm.check_health()
    assert_all_free(engine)
    async_llm.shutdown()


@pytest.mark.usefixtures("no_process_left_behind")
def test_tensor_parallel_ranks_run_dicts_as_one_rank_runs_plain_prompts(llm, rng):
    texts = [random_text(rng) for _ in range(rng.randint(1, 3))]
    ids = [random_prompt(rng, 1, 30) for _ in range(rng.randint(1, 3))]
    plain, dicts, reported = random_forms(rng, texts, ids)
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=2)
    expected = llm.generate(plain, params)
    with LLM(MODEL, block_size=4, num_kv_blocks=256, enable_prefix_caching=False,
             tensor_parallel_size=2, device="cpu") as tp2:
        got = tp2.generate(dicts, params)
    assert [(o.prompt, o.prompt_token_ids) for o in got] == \
        [(text, o.prompt_token_ids) for text, o in zip(reported, expected)]
    # The all-reduce adds in another order: a near tie may part the greedy tokens.
    assert_greedy_match(outputs_run(expected), outputs_run(got))

"""The engine end to end on real preset checkpoints (fp32, CPU, the real Worker)."""

import asyncio
import random

import pytest

from shardline import LLM, AsyncLLM, SamplingParams

MODEL = "tiny-llama"
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


def random_prompts(count, low=2, high=40):
    rng = random.Random()
    return [[rng.randrange(3, 259) for _ in range(rng.randint(low, high))] for _ in range(count)]


def token_ids(outputs):
    return [[c.token_ids for c in o.outputs] for o in outputs]


def assert_all_free(llm):
    engine = llm.engine
    engine.kv.check_invariants()
    assert engine.kv.num_free_blocks == engine.kv.num_blocks
    assert not engine.has_unfinished_requests()


@pytest.fixture(scope="module")
def reference_llm():
    """No prefix caching, a large budget: each prompt is run alone on it."""
    return LLM(MODEL, block_size=4, num_kv_blocks=256, enable_prefix_caching=False)


@pytest.fixture(scope="module")
def llm():
    return LLM(MODEL, block_size=4, num_kv_blocks=256, max_num_batched_tokens=24)


def test_greedy_batch_of_16_matches_each_prompt_alone(reference_llm, llm):
    prompts = random_prompts(16)
    alone = [reference_llm.generate([p], GREEDY)[0] for p in prompts]
    steps_before = llm.stats.num_steps
    batched = llm.generate(prompts, GREEDY)
    assert token_ids(batched) == token_ids(alone)
    assert llm.stats.num_steps - steps_before > 12  # chunked: the budget forced extra steps
    assert_all_free(llm)


@pytest.mark.parametrize("model", ["tiny-qwen2-moe", "tiny-mixtral"])
def test_moe_greedy_batch_matches_each_prompt_alone(model):
    prompts = random_prompts(16, 2, 24)
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    alone_llm = LLM(model, block_size=4, num_kv_blocks=256, enable_prefix_caching=False)
    alone = [alone_llm.generate([p], params)[0] for p in prompts]
    batched_llm = LLM(model, block_size=4, num_kv_blocks=256, max_num_batched_tokens=16)
    assert token_ids(batched_llm.generate(prompts, params)) == token_ids(alone)
    assert_all_free(batched_llm)


def test_prefix_cache_hit_matches_and_computes_less(reference_llm, llm):
    shared = random_prompts(1, 30, 30)[0]
    first, second = shared + [40, 41], shared + [50, 51, 52]
    expected = token_ids([reference_llm.generate([p], GREEDY)[0] for p in (first, second)])
    llm.generate([first], GREEDY)
    computed_before = llm.stats.num_computed_tokens
    out = llm.generate([second], GREEDY)[0]
    assert out.num_cached_tokens == 28
    assert llm.stats.num_computed_tokens - computed_before == len(second) - 28 + 11
    assert token_ids([llm.generate([first], GREEDY)[0], out]) == expected
    assert_all_free(llm)


def test_preemption_gives_the_same_tokens(reference_llm):
    prompts = random_prompts(6, 8, 20)
    params = SamplingParams(temperature=0.0, max_tokens=16)
    expected = token_ids([reference_llm.generate([p], params)[0] for p in prompts])
    small = LLM(MODEL, block_size=4, num_kv_blocks=16, max_num_batched_tokens=32)
    assert token_ids(small.generate(prompts, params)) == expected
    assert small.stats.num_preemptions > 0
    assert_all_free(small)


def test_seeded_sampling_is_reproducible_across_batches(reference_llm, llm):
    prompts = random_prompts(5)
    seeds = random.sample(range(10**6), 5)
    params = [SamplingParams(temperature=1.0, top_p=0.9, seed=s, max_tokens=10) for s in seeds]
    alone = [reference_llm.generate([p], s)[0] for p, s in zip(prompts, params)]
    assert token_ids(llm.generate(prompts, params)) == token_ids(alone)
    other = [SamplingParams(temperature=1.0, top_p=0.9, seed=s + 1, max_tokens=10) for s in seeds]
    assert token_ids(llm.generate(prompts, other)) != token_ids(alone)


def test_abort_frees_its_blocks(llm):
    prompts = random_prompts(2, 20, 30)
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    llm.add_request("keep", prompts[0], params)
    llm.add_request("drop", prompts[1], params)
    for _ in range(4):
        llm.step()
    free_before = llm.engine.kv.num_free_blocks
    assert llm.abort_request("drop").outputs[0].finish_reason == "abort"
    assert llm.engine.kv.num_free_blocks > free_before
    finished = []
    while llm.has_unfinished_requests():
        finished += [o.request_id for o in llm.step() if o.finished]
    assert finished == ["keep"]
    assert_all_free(llm)


def test_stop_token_and_stop_string(llm):
    prompt = random_prompts(1, 10, 10)[0]
    long_greedy = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    base = llm.generate([prompt], long_greedy)[0].outputs[0]
    token = base.token_ids[6]
    long_greedy.stop_token_ids = [token]
    out = llm.generate([prompt], long_greedy)[0].outputs[0]
    assert out.token_ids == base.token_ids[:base.token_ids.index(token) + 1]
    assert out.stop_reason == token
    long_greedy.stop_token_ids = []
    # Random weights emit arbitrary bytes: find an output with a whole character to stop on.
    for prompt in [prompt] + random_prompts(10, 10, 10):
        text = llm.generate([prompt], long_greedy)[0].outputs[0].text
        stop = next((c for c in text[len(text) // 2:] + text if c != "\ufffd"), None)
        if stop is not None:
            break
    assert stop is not None, "no greedy output had a complete character"
    long_greedy.stop = [stop]
    out = llm.generate([prompt], long_greedy)[0].outputs[0]
    assert out.text == text[:text.index(stop)]
    assert (out.finish_reason, out.stop_reason) == ("stop", stop)


def test_text_prompts_and_n_children(llm):
    params = SamplingParams(n=3, temperature=1.0, seed=11, max_tokens=6)
    out = llm.generate("The quick brown fox jumps", params)[0]
    assert out.prompt == "The quick brown fox jumps"
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert out.num_cached_tokens > 0
    for i, completion in enumerate(out.outputs):
        single = llm.generate(out.prompt_token_ids, SamplingParams(temperature=1.0, seed=11 + i,
                                                                   max_tokens=6))[0]
        assert completion.token_ids == single.outputs[0].token_ids
    assert_all_free(llm)


@pytest.mark.parametrize("prompt, fields, message", [
    ([], {}, "empty"),
    ([5] * 600, {}, "max_model_len"),
    ([5, 320], {}, "vocabulary"),
    ([5, 6], {"max_tokens": 0}, "max_tokens"),
    ([5, 6], {"temperature": -1.0}, "temperature"),
    ([5, 6], {"top_p": 0.0}, "top_p"),
    ([5, 6], {"top_p": 1.01}, "top_p"),
    ([5, 6], {"n": 0}, "n"),
])
def test_bad_request_raises_while_others_complete(llm, prompt, fields, message):
    good = random_prompts(1)[0]
    llm.add_request("good", good, GREEDY)
    llm.step()
    bad = SamplingParams(temperature=0.0)
    for name, value in fields.items():
        setattr(bad, name, value)
    with pytest.raises(ValueError, match=message):
        llm.add_request("bad", prompt, bad)
    outputs = []
    while llm.has_unfinished_requests():
        outputs += [o for o in llm.step() if o.finished]
    assert [o.request_id for o in outputs] == ["good"]
    assert len(outputs[0].outputs[0].token_ids) == 12
    assert_all_free(llm)


def test_async_llm_streams_and_finishes():
    llm = AsyncLLM(MODEL, block_size=4, num_kv_blocks=64)
    prompts = random_prompts(3, 4, 12)

    async def stream(i):
        return [o async for o in llm.generate(prompts[i], GREEDY, f"s{i}")]

    async def main():
        return await asyncio.gather(*(stream(i) for i in range(3)))

    for outputs in asyncio.run(main()):
        assert [len(o.outputs[0].token_ids) for o in outputs] == list(range(1, 13))
        assert outputs[-1].finished
    assert llm.engine.kv.num_free_blocks == llm.engine.kv.num_blocks
    llm.shutdown()


def test_logprobs_of_greedy_tokens_are_the_top_ones(llm):
    params = SamplingParams(temperature=0.0, max_tokens=5, logprobs=3, ignore_eos=True)
    out = llm.generate(random_prompts(1)[0], params)[0].outputs[0]
    assert len(out.logprobs) == 5
    for token, logprobs in zip(out.token_ids, out.logprobs):
        assert len(logprobs) >= 3 and all(lp <= 0.0 for lp in logprobs.values())
        assert logprobs[token] == max(logprobs.values())
    assert out.cumulative_logprob == pytest.approx(
        sum(lp[t] for lp, t in zip(out.logprobs, out.token_ids)))

"""The engine end to end on real preset checkpoints (fp32, CPU, the real Worker)."""

import asyncio
import random
from types import SimpleNamespace

import pytest

from fake_engine_checks import assert_all_free, token_ids
from near_ties import (assert_greedy_match, assert_sampled_match, outputs_run, sampled_run,
                       worker_device)
from shardline import LLM, AsyncLLM, SamplingParams

MODEL = "tiny-llama"
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
# With the top two logprobs, for comparisons of runs whose arithmetic differs.
GREEDY_TOP2 = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=2)


pytestmark = pytest.mark.usefixtures("seeded_random")


def random_prompts(count, low=2, high=40):
    return [[random.randrange(3, 259) for _ in range(random.randint(low, high))]
            for _ in range(count)]


@pytest.fixture(scope="module")
def reference_llm():
    """No prefix caching, a large budget: each prompt is run alone on it."""
    return LLM(MODEL, block_size=4, num_kv_blocks=256, enable_prefix_caching=False)


@pytest.fixture(scope="module")
def llm():
    return LLM(MODEL, block_size=4, num_kv_blocks=256, max_num_batched_tokens=24,
               max_num_seqs=24)


def test_greedy_batch_of_16_matches_each_prompt_alone(reference_llm, llm):
    prompts = random_prompts(16)
    alone = [reference_llm.generate([p], GREEDY_TOP2)[0] for p in prompts]
    steps_before = llm.stats.num_steps
    batched = llm.generate(prompts, GREEDY_TOP2)
    assert_greedy_match(outputs_run(alone), outputs_run(batched))
    assert llm.stats.num_steps - steps_before > 12  # chunked: the budget forced extra steps
    assert_all_free(llm.engine)


@pytest.mark.parametrize("model", ["tiny-qwen2-moe", "tiny-mixtral"])
def test_moe_greedy_batch_matches_each_prompt_alone(model):
    prompts = random_prompts(16, 2, 24)
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=3)
    alone_llm = LLM(model, block_size=4, num_kv_blocks=256, enable_prefix_caching=False)
    alone = [alone_llm.generate([p], params)[0] for p in prompts]
    batched_llm = LLM(model, block_size=4, num_kv_blocks=256, max_num_batched_tokens=16,
                      max_num_seqs=16)
    assert_greedy_match(outputs_run(alone), outputs_run(batched_llm.generate(prompts, params)),
                        moe=True)
    assert_all_free(batched_llm.engine)


def test_prefix_cache_hit_matches_and_computes_less(reference_llm, llm):
    shared = random_prompts(1, 30, 30)[0]
    first, second = shared + [40, 41], shared + [50, 51, 52]
    expected = [reference_llm.generate([p], GREEDY_TOP2)[0] for p in (first, second)]
    llm.generate([first], GREEDY_TOP2)
    computed_before = llm.stats.num_computed_tokens
    out = llm.generate([second], GREEDY_TOP2)[0]
    assert out.num_cached_tokens == 28
    assert llm.stats.num_computed_tokens - computed_before == len(second) - 28 + 11
    assert_greedy_match(outputs_run(expected),
                        outputs_run([llm.generate([first], GREEDY_TOP2)[0], out]))
    assert_all_free(llm.engine)


def test_preemption_gives_the_same_tokens(reference_llm):
    prompts = random_prompts(6, 8, 20)
    params = SamplingParams(temperature=0.0, max_tokens=16, logprobs=2)
    expected = [reference_llm.generate([p], params)[0] for p in prompts]
    small = LLM(MODEL, block_size=4, num_kv_blocks=16, max_num_batched_tokens=32,
                max_num_seqs=32)
    assert_greedy_match(outputs_run(expected), outputs_run(small.generate(prompts, params)))
    assert small.stats.num_preemptions > 0
    assert_all_free(small.engine)


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_preemption_prefix_caching_and_chunks_together_give_the_same_tokens(reference_llm,
                                                                           async_scheduling):
    """A cache for two or three of eight sequences, prompts that share prefixes, a budget
    of 8 tokens: sequences are preempted, resume from cached blocks, and prefill in chunks."""
    shared = random_prompts(2, 8, 16)
    prompts = [random.choice(shared) + tail for tail in random_prompts(8, 1, 12)]
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, logprobs=2)
    expected = [reference_llm.generate([p], params)[0] for p in prompts]
    small = LLM(MODEL, block_size=4, num_kv_blocks=24, max_num_batched_tokens=8,
                max_num_seqs=8, async_scheduling=async_scheduling)
    assert_greedy_match(outputs_run(expected), outputs_run(small.generate(prompts, params)))
    assert small.stats.num_preemptions > 0 and small.stats.num_cached_tokens > 0
    assert_all_free(small.engine)


def test_seeded_sampling_is_reproducible_across_batches(reference_llm, llm):
    """Equal draws alone and in a batch computed in chunks, up to a near tie of a draw (the
    two round apart)."""
    prompts = random_prompts(5)
    seeds = random.sample(range(10**6), 5)
    params = [SamplingParams(temperature=1.0, top_p=0.9, seed=s, max_tokens=10, logprobs=0)
              for s in seeds]
    alone = [reference_llm.generate([p], s)[0] for p, s in zip(prompts, params)]
    expected, drawn_with = sampled_run(alone, params)
    got, _ = sampled_run(llm.generate(prompts, params), params)
    assert_sampled_match(expected, got, drawn_with, llm.engine.vocab_size, worker_device(llm))
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
    assert_all_free(llm.engine)


def test_stop_token_and_stop_string(reference_llm):
    """Each run is compared with the free one of the same prompt: without prefix caching
    their arithmetic is the same, so the tokens are equal up to the stop, near ties too."""
    prompt = random_prompts(1, 10, 10)[0]
    long_greedy = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    base = reference_llm.generate([prompt], long_greedy)[0].outputs[0]
    token = base.token_ids[6]
    long_greedy.stop_token_ids = [token]
    out = reference_llm.generate([prompt], long_greedy)[0].outputs[0]
    assert out.token_ids == base.token_ids[:base.token_ids.index(token) + 1]
    assert out.stop_reason == token
    long_greedy.stop_token_ids = []
    # Random weights emit arbitrary bytes: find an output with a whole character to stop on.
    for prompt in [prompt] + random_prompts(10, 10, 10):
        text = reference_llm.generate([prompt], long_greedy)[0].outputs[0].text
        stop = next((c for c in text[len(text) // 2:] + text if c != "\ufffd"), None)
        if stop is not None:
            break
    assert stop is not None, "no greedy output had a complete character"
    long_greedy.stop = [stop]
    out = reference_llm.generate([prompt], long_greedy)[0].outputs[0]
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
    assert_all_free(llm.engine)


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
    assert_all_free(llm.engine)


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


def test_async_llm_never_streams_text_that_a_stop_string_takes_back():
    """Stop strings of two or three characters from a greedy output (random weights emit
    one byte per token, so each spans tokens): every streamed text extends the one before
    and begins the final one, which is the output without stop cut before the stop. No
    prefix caching: from cached blocks the run with a stop string would compute apart, and
    rounding could flip a greedy token at a near tie before the stop."""
    llm = AsyncLLM(MODEL, block_size=4, num_kv_blocks=64, enable_prefix_caching=False)
    greedy = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)

    async def stream(prompt, params, request_id):
        return [o.outputs[0] async for o in llm.generate(prompt, params, request_id)]

    async def main():
        cases = []
        for i, prompt in enumerate(random_prompts(8, 4, 12)):
            text = (await stream(prompt, greedy, f"free{i}"))[-1].text
            starts = [j for j in range(len(text) - 2) if "\ufffd" not in text[j:j + 3]]
            if starts:
                start = random.choice(starts)
                stop = text[start:start + random.choice([2, 3])]
                stopped = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True,
                                         stop=[stop])
                cases.append((text, stop, await stream(prompt, stopped, f"stop{i}")))
        return cases

    cases = asyncio.run(main())
    llm.shutdown()
    assert cases, "no greedy output had three complete characters in a row"
    for text, stop, streamed in cases:
        final = streamed[-1]
        assert (final.text, final.stop_reason) == (text[:text.index(stop)], stop)
        for before, after in zip(streamed, streamed[1:]):
            assert after.text.startswith(before.text), (stop, before.text, after.text)


def test_logprobs_of_greedy_tokens_are_the_top_ones(llm):
    params = SamplingParams(temperature=0.0, max_tokens=5, logprobs=3, ignore_eos=True)
    out = llm.generate(random_prompts(1)[0], params)[0].outputs[0]
    assert len(out.logprobs) == 5
    for token, logprobs in zip(out.token_ids, out.logprobs):
        assert len(logprobs) >= 3 and all(lp <= 0.0 for lp in logprobs.values())
        assert logprobs[token] == max(logprobs.values())
    assert out.cumulative_logprob == pytest.approx(
        sum(lp[t] for lp, t in zip(out.logprobs, out.token_ids)))


BAD_PROMPTS = [
    (None, r"prompt=None \(NoneType\) is not a prompt"),
    (7, r"prompt=7 \(int\) is not a prompt"),
    ({5: 6}, r"prompt=\{5: 6\} \(dict\) is not a prompt"),
    (b"\x05\x06", r"prompt=b'\\x05\\x06' \(bytes\) is not a prompt"),
    ([True, False], r"prompt\[0\]=True is not a token id"),
]
BAD_PARAMS = [
    (7, r"sampling_params=7 \(int\) is not a SamplingParams"),
    ({"max_tokens": 3}, r"sampling_params=\{'max_tokens': 3\} \(dict\) is not a SamplingParams"),
]


@pytest.mark.parametrize("prompt, message", BAD_PROMPTS)
def test_prompt_of_the_wrong_type_raises_value_error(llm, prompt, message):
    good = random_prompts(1)[0]
    llm.add_request("good", good, GREEDY)
    llm.step()
    with pytest.raises(ValueError, match=message):
        llm.add_request("bad", prompt, GREEDY)
    with pytest.raises(ValueError, match=message):
        llm.engine.encode_prompt(prompt, GREEDY)
    with pytest.raises(ValueError, match="prompt 1: " + message):
        llm.generate([good, prompt], GREEDY)
    finished = []
    while llm.has_unfinished_requests():
        finished += [o for o in llm.step() if o.finished]
    assert [o.request_id for o in finished] == ["good"]
    assert len(finished[0].outputs[0].token_ids) == 12
    assert_all_free(llm.engine)


@pytest.mark.parametrize("params, message", BAD_PARAMS)
def test_sampling_params_of_the_wrong_type_raise_value_error(llm, params, message):
    prompt = random_prompts(1)[0]
    with pytest.raises(ValueError, match=message):
        llm.add_request("bad", prompt, params)
    with pytest.raises(ValueError, match=message):
        llm.engine.encode_prompt(prompt, params)
    with pytest.raises(ValueError, match="prompt 1: " + message):
        llm.generate([prompt, prompt], [GREEDY, params])
    assert_all_free(llm.engine)


def test_a_flat_list_of_numpy_token_ids_is_one_prompt(reference_llm):
    import numpy as np
    prompt = random_prompts(1)[0]
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    [ours] = reference_llm.generate(list(np.array(prompt, dtype=np.int64)), params)
    assert ours.prompt_token_ids == prompt
    again, = reference_llm.generate(prompt, params)   # without a cache: the same arithmetic
    assert ours.outputs[0].token_ids == again.outputs[0].token_ids


@pytest.mark.parametrize("prompts, params, message", [
    (None, None, r"prompts=None \(NoneType\) is invalid"),
    (7, None, r"prompts=7 \(int\) is invalid"),
    # A dict is one prompt (vLLM's TextPrompt / TokensPrompt), refused for its key.
    ({5: 6}, None, r"prompt 0: prompt=\{5: 6\} \(dict\) is not a prompt: it has the key 5,"),
    (b"\x05\x06", None, r"prompts=b'\\x05\\x06' \(bytes\) is invalid"),
    ([[5, 6]], 7, r"sampling_params=7 \(int\) is invalid"),
    ([[5, 6]], {"max_tokens": 3}, r"sampling_params=\{'max_tokens': 3\} \(dict\) is invalid"),
])
def test_generate_rejects_containers_of_the_wrong_type(llm, prompts, params, message):
    with pytest.raises(ValueError, match=message):
        llm.generate(prompts, params)
    assert_all_free(llm.engine)


def test_generate_tokenizes_each_text_prompt_once(llm, monkeypatch):
    tokenizer = llm.engine.tokenizer
    calls = []

    def counting_encode(text):
        calls.append(text)
        return tokenizer.encode(text)
    monkeypatch.setattr(llm.engine, "tokenizer", SimpleNamespace(encode=counting_encode,
                                                                 decode=tokenizer.decode))
    prompts = ["The sky is", "Hello there", "abc"]
    outputs = llm.generate(prompts, GREEDY)
    assert calls == prompts
    assert [o.prompt for o in outputs] == prompts
    assert [o.prompt_token_ids for o in outputs] == [tokenizer.encode(p) for p in prompts]
    assert_all_free(llm.engine)


def test_abort_between_steps_drops_the_request_and_leaves_the_others_exact(reference_llm, llm):
    """Incremental API: one request aborted mid-prefill and one mid-decode, each between two
    steps, while two others run on; the others' tokens match each prompt run alone."""
    keep = random_prompts(2, 8, 16)
    mid_prefill, mid_decode = random_prompts(1, 40, 60)[0], random_prompts(1, 4, 8)[0]
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, logprobs=2)
    expected = [reference_llm.generate([p], params)[0] for p in keep]
    engine = llm.engine
    llm.add_request("decode", mid_decode, params)
    for i, prompt in enumerate(keep):
        llm.add_request(f"keep{i}", prompt, params)
    llm.add_request("prefill", mid_prefill, params)
    prefilling = engine.scheduler.seqs["prefill"]
    while prefilling.num_computed_tokens == 0:  # a budget of 24 a step chunks its prefill
        llm.step()
    assert prefilling.num_computed_tokens < prefilling.num_tokens
    free_before = engine.kv.num_free_blocks
    aborted = llm.abort_request("prefill")
    assert aborted.outputs[0].finish_reason == "abort" and aborted.outputs[0].token_ids == []
    assert engine.kv.num_free_blocks > free_before
    final = {}
    for output in llm.step():
        assert output.request_id != "prefill"
        final[output.request_id] = output
    decoded = final["decode"].outputs[0].token_ids
    free_before = engine.kv.num_free_blocks
    aborted = llm.abort_request("decode")
    assert aborted.outputs[0].finish_reason == "abort"
    assert aborted.outputs[0].token_ids == decoded
    assert engine.kv.num_free_blocks > free_before
    assert llm.abort_request("decode") is None
    while llm.has_unfinished_requests():
        for output in llm.step():
            assert output.request_id in ("keep0", "keep1")
            final[output.request_id] = output
    assert_greedy_match(outputs_run(expected), outputs_run([final["keep0"], final["keep1"]]))
    assert_all_free(llm.engine)

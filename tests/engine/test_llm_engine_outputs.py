"""What the engine over the checking fake worker returns: where stop tokens, stop strings,
EOS, max_tokens and max_model_len end a completion, logprobs, and outputs that are
snapshots built without revisiting earlier tokens."""

import statistics
import tracemalloc

import pytest

from fake_engine_checks import GREEDY, assert_all_free
from fake_model import make_engine, random_prompts
from shardline.engine.llm import LLM
from shardline.sampling_params import SamplingParams

pytestmark = pytest.mark.usefixtures("seeded_random")


def test_stop_token_eos_and_ignore_eos():
    prompt = random_prompts(1, 10, 10)[0]
    full = LLM.from_engine(make_engine()).generate([prompt], GREEDY)[0].outputs[0].token_ids
    stop_at = 5
    token = full[stop_at]
    first = full.index(token)
    out = LLM.from_engine(make_engine()).generate(
        [prompt], SamplingParams(temperature=0.0, max_tokens=12, stop_token_ids=[token]))[0]
    completion = out.outputs[0]
    assert completion.token_ids == full[:first + 1]
    assert (completion.finish_reason, completion.stop_reason) == ("stop", token)
    eos_engine = make_engine(eos_token_ids=(token,))
    llm = LLM.from_engine(eos_engine)
    eos_out = llm.generate([prompt], GREEDY)[0].outputs[0]
    assert eos_out.token_ids == full[:first + 1] and eos_out.stop_reason is None
    ignored = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=12,
                                                    ignore_eos=True))[0].outputs[0]
    assert ignored.token_ids == full and ignored.finish_reason == "length"
    assert_all_free(eos_engine)


def test_stop_string_truncates_text():
    llm = LLM.from_engine(make_engine())
    prompt = "helloworld"
    base = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=20))[0].outputs[0]
    stop = base.text[6:8]
    cut = base.text.index(stop)
    out = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=20, stop=[stop]))[0]
    completion = out.outputs[0]
    assert completion.text == base.text[:cut]
    assert (completion.finish_reason, completion.stop_reason) == ("stop", stop)
    assert completion.token_ids == base.token_ids[:cut + len(stop)]
    assert out.prompt == prompt


def test_max_tokens_and_max_model_len_limit_length():
    engine = make_engine(max_model_len=20)
    llm = LLM.from_engine(engine)
    prompts = random_prompts(2, 15, 15)
    out = llm.generate(prompts, [SamplingParams(temperature=0.0, max_tokens=3),
                                 SamplingParams(temperature=0.0, max_tokens=50)])
    assert [len(o.outputs[0].token_ids) for o in out] == [3, 5]
    assert all(o.outputs[0].finish_reason == "length" for o in out)
    assert_all_free(engine)


def test_max_tokens_none_stops_at_max_model_len_or_the_kv_capacity():
    prompt = random_prompts(1, 5, 10)[0]
    unbounded = SamplingParams(temperature=0.0, max_tokens=None)
    long_cache = make_engine(num_blocks=64, block_size=4, max_model_len=30)
    out = LLM.from_engine(long_cache).generate([prompt], unbounded)[0].outputs[0]
    assert (len(prompt) + len(out.token_ids), out.finish_reason) == (30, "length")
    short_cache = make_engine(num_blocks=5, block_size=4, max_model_len=256)
    out = LLM.from_engine(short_cache).generate([prompt], unbounded)[0].outputs[0]
    assert (len(prompt) + len(out.token_ids), out.finish_reason) == (21, "length")
    assert_all_free(short_cache)


def test_outputs_are_snapshots_built_without_revisiting_earlier_tokens():
    engine = make_engine(max_model_len=512, num_blocks=128)
    steps = 400
    params = SamplingParams(temperature=0.0, max_tokens=steps, logprobs=2, ignore_eos=True)
    engine.add_request("r", random_prompts(1, 5, 10)[0], params)
    process, allocated = engine.outputs.process, {}

    def traced(sampled):
        start = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        result = process(sampled)
        allocated[sampled[0].num_output_tokens] = tracemalloc.get_traced_memory()[1] - start
        return result
    engine.outputs.process = traced
    outputs = []
    tracemalloc.start()
    try:
        while engine.has_unfinished_requests():
            outputs += engine.step()
    finally:
        tracemalloc.stop()
    final = outputs[-1].outputs[0]
    assert len(outputs) == steps and final.finish_reason == "length"
    for k, output in enumerate(outputs, 1):
        completion = output.outputs[0]
        assert len(completion.token_ids) == k and completion.token_ids == final.token_ids[:k]
        assert completion.logprobs == final.logprobs[:k]
        assert completion.cumulative_logprob == pytest.approx(-0.5 * k)
    assert list(final.token_ids) == final.token_ids[:] and final.token_ids[-1] in final.logprobs[-1]
    # Bytes allocated by a step's output building: the same 350 tokens later (the text,
    # one letter per token here, is the only thing that grows).
    early = statistics.median(allocated[k] for k in range(10, 40))
    late = statistics.median(allocated[k] for k in range(360, 390))
    assert late - early < 1024, (early, late)


def test_logprobs_are_reported_when_asked():
    out = LLM.from_engine(make_engine()).generate(
        [[3, 4, 5]], SamplingParams(temperature=0.0, max_tokens=4, logprobs=2))[0].outputs[0]
    assert len(out.logprobs) == 4
    assert all(set(lp) >= {0, 1, tok} for lp, tok in zip(out.logprobs, out.token_ids))
    assert out.cumulative_logprob == pytest.approx(-2.0)

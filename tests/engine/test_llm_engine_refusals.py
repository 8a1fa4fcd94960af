"""Requests the engine refuses, each with a ValueError naming what is wrong, while the other
requests keep being served: bad prompts and sampling params, a request that can never fit
the KV cache or the step budget, a duplicate request id or one that is no string of text,
too many logprobs."""

import random

import pytest

from fake_engine_checks import GREEDY, assert_all_free
from fake_model import VOCAB, make_engine, random_prompts
from shardline.engine.llm import LLM
from shardline.sampling_params import SamplingParams

pytestmark = pytest.mark.usefixtures("seeded_random")


@pytest.mark.parametrize("prompt, params, message", [
    ([], None, "empty"),
    ([1] * 300, None, "max_model_len"),
    ([1, VOCAB], None, "vocabulary"),
    ([1, -1], None, "vocabulary"),
    ([1, 2], dict(max_tokens=0), "max_tokens"),
    ([1, 2], dict(temperature=-0.5), "temperature"),
    ([1, 2], dict(top_p=0.0), "top_p"),
    ([1, 2], dict(top_p=1.5), "top_p"),
    ([1, 2], dict(n=0), "n"),
    ([1, 2], dict(stop_token_ids=[VOCAB + 3]), "stop_token_ids"),
    ([1, 2], dict(stop_token_ids=["a"]), "stop_token_ids"),
    ([1, 2.5], None, r"prompt\[1\]=2.5 is not a token id"),
    ([1, "7"], None, r"prompt\[1\]='7' is not a token id"),
    ([1, 2], dict(temperature=1e-30), "temperature"),
    ([1, 2], dict(logprobs=VOCAB + 1), f"logprobs={VOCAB + 1} is invalid: must be None or at "
                                       f"most {VOCAB}"),
    ([1, 2], dict(logprobs=10**9), "logprobs=1000000000"),
    # Set after construction, these raised TypeError from inside validate.
    ([1, 2], dict(stop=5), r"SamplingParams\.stop=5 is invalid"),
    ([1, 2], dict(stop_token_ids=2.5), r"SamplingParams\.stop_token_ids=2\.5 is invalid"),
    # Taken before: NaN logprobs.
    ([1, 2], dict(repetition_penalty=1e-40), "repetition_penalty=1e-40"),
    ([1, 2], dict(repetition_penalty=1e39), "repetition_penalty=1e\\+39"),
])
def test_bad_request_fails_alone(prompt, params, message):
    engine = make_engine()
    good = random_prompts(2, 5, 10)
    engine.add_request("good0", good[0], GREEDY)
    engine.step()
    sampling = SamplingParams(temperature=0.0)
    for name, value in (params or {}).items():
        setattr(sampling, name, value)  # bypass construction-time checks: add_request re-checks
    with pytest.raises(ValueError, match=message):
        engine.add_request("bad", prompt, sampling)
    with pytest.raises(ValueError, match=f"prompt 1: .*{message}"):
        LLM.from_engine(engine).generate([good[1], prompt], [GREEDY, sampling])
    engine.add_request("good1", good[1], GREEDY)
    done = set()
    while engine.has_unfinished_requests():
        done |= {o.request_id for o in engine.step() if o.finished}
    assert done == {"good0", "good1"}
    assert_all_free(engine)


def test_request_that_never_fits_the_kv_cache_is_refused_naming_the_numbers():
    block_size = random.choice([1, 2, 4, 8])
    num_blocks = random.randint(2, 64 // block_size)
    capacity = num_blocks * block_size
    engine = make_engine(num_blocks=num_blocks, block_size=block_size, max_model_len=256)
    prompt = random_prompts(1, 1, capacity)[0]
    fits = capacity - len(prompt) + 1   # the last sampled token needs no KV
    fitting = SamplingParams(temperature=0.0, max_tokens=fits)
    engine.add_request("fits", prompt, fitting)
    too_long = SamplingParams(temperature=0.0, max_tokens=fits + 1)
    with pytest.raises(ValueError, match=(
            rf"prompt has {len(prompt)} tokens and max_tokens={fits + 1}: the sequence needs "
            rf"KV for {capacity + 1} tokens and can never fit in the KV cache, which holds "
            rf"{capacity} \({num_blocks} blocks x {block_size} tokens, fewer than "
            r"max_model_len=256\)")):
        engine.add_request("too-long", prompt, too_long)
    with pytest.raises(ValueError, match="prompt 1: .*can never fit in the KV cache"):
        LLM.from_engine(engine).generate([prompt, prompt], [fitting, too_long])
    with pytest.raises(ValueError, match=f"prompt has {capacity + 1} tokens: .*shorten"):
        engine.add_request("long-prompt", [1] * (capacity + 1), SamplingParams(max_tokens=None))
    outputs = {}
    while engine.has_unfinished_requests():
        outputs.update((o.request_id, o) for o in engine.step() if o.finished)
    assert list(outputs) == ["fits"]
    assert len(outputs["fits"].outputs[0].token_ids) == fits
    assert_all_free(engine)


def test_prompt_over_budget_without_chunked_prefill_is_refused():
    engine = make_engine(max_num_batched_tokens=8, max_num_seqs=8, enable_chunked_prefill=False)
    with pytest.raises(ValueError, match="max_num_batched_tokens=8.*enable_chunked_prefill"):
        engine.add_request("long", list(range(1, 10)), GREEDY)
    engine.add_request("short", list(range(1, 9)), GREEDY)
    while engine.has_unfinished_requests():
        engine.step()
    assert_all_free(engine)


@pytest.mark.parametrize("request_id, message", [
    (("r",), r"request_id=\('r',\) \(tuple\) is invalid: must be a string"),
    (7, r"request_id=7 \(int\) is invalid: must be a string"),
    (None, r"request_id=None \(NoneType\) is invalid: must be a string"),
    (b"r", r"request_id=b'r' \(bytes\) is invalid: must be a string"),
])
def test_request_id_that_cannot_reach_the_workers_is_refused(request_id, message):
    """The ids travel to the workers by msgpack: a tuple came back as a list, which the
    engine could not look up (TypeError: unhashable), and failed the step, and the engine
    with every request in it."""
    engine = make_engine()
    good = random_prompts(2, 5, 10)
    engine.add_request("good0", good[0], GREEDY)
    with pytest.raises(ValueError, match=message):
        engine.add_request(request_id, good[1], GREEDY)
    done = set()
    while engine.has_unfinished_requests():
        done |= {o.request_id for o in engine.step() if o.finished}
    assert done == {"good0"}
    assert_all_free(engine)


def test_duplicate_request_id_is_rejected():
    engine = make_engine()
    engine.add_request("a", [1, 2, 3])
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("a", [4, 5])
    engine.abort_request("a")
    assert_all_free(engine)


@pytest.mark.parametrize("field", ["logprobs", "prompt_logprobs"])
def test_logprobs_beyond_the_vocabulary_are_refused_and_the_engine_keeps_serving(field):
    engine = make_engine(max_logprobs=-1)
    llm = LLM.from_engine(engine)
    prompt, other = random_prompts(2, 3, 10)
    engine.add_request("running", other, GREEDY)
    engine.step()
    too_many = VOCAB + random.choice([1, random.randint(2, 10**12)])
    params = SamplingParams(temperature=0.0, max_tokens=3, **{field: too_many})
    with pytest.raises(ValueError, match=f"SamplingParams.{field}={too_many} is invalid: must "
                                         f"be None or at most {VOCAB}, the model's vocabulary "
                                         f"size"):
        llm.generate([prompt], params)
    # Params changed after encode_prompt are checked again when the ids come with them.
    setattr(params, field, VOCAB)
    _, ids = engine.encode_prompt(prompt, params)
    setattr(params, field, too_many)
    with pytest.raises(ValueError, match=f"{field}={too_many}"):
        engine.add_request("late", prompt, params, prompt_token_ids=ids)
    finished = []
    while engine.has_unfinished_requests():
        finished += [o for o in engine.step() if o.finished]
    assert [(o.request_id, len(o.outputs[0].token_ids)) for o in finished] == [("running", 12)]
    setattr(params, field, VOCAB)
    whole, = llm.generate([prompt], params)
    assert len(whole.outputs[0].token_ids) == 3
    if field == "logprobs":  # the fake model computes no prompt logprobs
        assert [len(lp) for lp in whole.outputs[0].logprobs] == [VOCAB] * 3
    assert_all_free(engine)


def test_min_tokens_with_every_token_a_stop_token_is_refused():
    """Short of min_tokens the sampler masks the stop tokens (and eos, unless ignored):
    when they are the whole vocabulary nothing is left to draw, and tiny-llama drew token
    0, itself a stop token, with NaN logprobs."""
    eos = random.randrange(VOCAB)
    engine = make_engine(eos_token_ids=(eos,))
    llm = LLM.from_engine(engine)
    prompt = random_prompts(1, 3, 10)[0]
    min_tokens = random.randint(1, 5)
    stops = random.sample([t for t in range(VOCAB) if t != eos], VOCAB - 1)
    for stop_ids, ignore_eos in ((stops, False), (stops + [eos], random.random() < 0.5)):
        params = SamplingParams(temperature=0.0, max_tokens=8, min_tokens=min_tokens,
                                stop_token_ids=stop_ids, ignore_eos=ignore_eos)
        with pytest.raises(ValueError, match=f"SamplingParams.min_tokens={min_tokens} is "
                                             f"invalid: .* all {VOCAB} tokens"):
            llm.generate([prompt], params)
    # One token left to draw (eos, ignored), or min_tokens 0 (nothing masked), is served.
    for params in (SamplingParams(temperature=0.0, max_tokens=8, min_tokens=min_tokens,
                                  stop_token_ids=stops, ignore_eos=True),
                   SamplingParams(temperature=0.0, max_tokens=8, stop_token_ids=stops)):
        whole, = llm.generate([prompt], params)
        assert whole.finished
    assert_all_free(engine)


@pytest.mark.parametrize("field", ["logprobs", "prompt_logprobs"])
def test_logprobs_beyond_max_logprobs_are_refused_naming_it(field):
    limit = random.randint(0, 30)
    engine = make_engine(max_logprobs=limit)
    llm = LLM.from_engine(engine)
    prompt, = random_prompts(1, 3, 10)
    with pytest.raises(ValueError, match=f"SamplingParams.{field}={limit + 1} is invalid: must "
                                         f"be None or at most {limit}, the engine's "
                                         "max_logprobs"):
        llm.generate([prompt], SamplingParams(max_tokens=2, **{field: limit + 1}))
    whole, = llm.generate([prompt], SamplingParams(max_tokens=2, **{field: limit}))
    assert len(whole.outputs[0].token_ids) == 2
    assert_all_free(engine)


def test_a_prompt_with_a_lone_surrogate_is_refused_naming_it(tiny_chat_model):
    llm = LLM(tiny_chat_model, device="cpu")
    at = random.randint(0, 5)
    text = "hello!"[:at] + chr(random.randint(0xD800, 0xDFFF)) + "hello!"[at:]
    with pytest.raises(ValueError, match=f"prompt holds .* at index {at}, a lone UTF-16 "
                                         "surrogate"):
        llm.generate([text], SamplingParams(max_tokens=2))
    whole, = llm.generate(["hello"], SamplingParams(max_tokens=2, ignore_eos=True))
    assert len(whole.outputs[0].token_ids) == 2
    llm.shutdown()

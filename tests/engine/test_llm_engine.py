"""The engine end to end over the checking fake worker (tests/engine/fake_model.py)."""

import asyncio
import contextlib
import random
import statistics
import threading
import time
import tracemalloc

import pytest

from fake_model import VOCAB, make_engine, random_prompts
from shardline.engine.async_llm import AsyncLLM
from shardline.engine.llm import LLM
from shardline.sampling_params import SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=12)


@pytest.fixture(autouse=True)
def _seed_random(fresh_seed):
    random.seed(fresh_seed)


def assert_all_free(engine) -> None:
    engine.kv.check_invariants()
    assert engine.kv.num_free_blocks == engine.kv.num_blocks
    assert not engine.has_unfinished_requests()
    assert not engine.scheduler.seqs


def token_ids(outputs):
    return [[c.token_ids for c in o.outputs] for o in outputs]


def test_batch_invariance_with_chunked_prefill():
    prompts = random_prompts(16)
    alone = []
    for prompt in prompts:
        engine = make_engine()
        alone += LLM.from_engine(engine).generate([prompt], GREEDY)
    engine = make_engine(max_num_batched_tokens=7, max_num_seqs=7)
    batched = LLM.from_engine(engine).generate(prompts, GREEDY)
    assert token_ids(batched) == token_ids(alone)
    assert all(len(o.outputs[0].token_ids) == 12 for o in batched)
    assert max(s.total_num_scheduled_tokens for s in engine.executor.steps) <= 7
    assert_all_free(engine)


def test_prefix_cache_hit_computes_fewer_tokens_and_matches():
    shared = random_prompts(1, 30, 30)[0]
    first, second = shared + [1, 2, 3], shared + [4, 5]
    reference = LLM.from_engine(make_engine(enable_prefix_caching=False)).generate(
        [first, second], GREEDY)
    engine = make_engine(block_size=4)
    llm = LLM.from_engine(engine)
    out_first = llm.generate([first], GREEDY)[0]
    computed_before = engine.stats.num_computed_tokens
    out_second = llm.generate([second], GREEDY)[0]
    assert out_first.num_cached_tokens == 0
    assert out_second.num_cached_tokens == 28  # 7 full blocks of the shared 30 tokens
    assert engine.stats.num_computed_tokens - computed_before == len(second) - 28 + 11
    assert token_ids([out_first, out_second]) == token_ids(reference)
    assert_all_free(engine)


def test_block_aligned_prompt_recomputes_its_last_token():
    prompt = random_prompts(1, 16, 16)[0]
    engine = make_engine(block_size=4)
    llm = LLM.from_engine(engine)
    first = llm.generate([prompt], GREEDY)[0]
    again = llm.generate([prompt], GREEDY)[0]
    assert again.num_cached_tokens == 12
    assert again.outputs[0].token_ids == first.outputs[0].token_ids
    assert_all_free(engine)


def test_preemption_gives_the_same_tokens():
    prompts = random_prompts(8, 5, 20)
    params = SamplingParams(temperature=0.0, max_tokens=24)
    reference = LLM.from_engine(make_engine()).generate(prompts, params)
    for caching in (True, False):
        engine = make_engine(num_blocks=14, block_size=4, enable_prefix_caching=caching)
        outputs = LLM.from_engine(engine).generate(prompts, params)
        assert engine.stats.num_preemptions > 0
        assert token_ids(outputs) == token_ids(reference)
        assert_all_free(engine)


def test_seeded_sampling_is_reproducible_and_seed_dependent():
    prompts = random_prompts(6)
    seeded = [SamplingParams(temperature=0.8, seed=i, max_tokens=10) for i in range(6)]
    alone = [LLM.from_engine(make_engine()).generate([p], s)[0] for p, s in zip(prompts, seeded)]
    engine = make_engine(num_blocks=20, max_num_batched_tokens=9, max_num_seqs=9)
    batched = LLM.from_engine(engine).generate(prompts, seeded)
    assert token_ids(batched) == token_ids(alone)
    other = LLM.from_engine(make_engine()).generate(
        prompts, [SamplingParams(temperature=0.8, seed=100 + i, max_tokens=10) for i in range(6)])
    assert token_ids(other) != token_ids(alone)
    assert_all_free(engine)


def test_incremental_api_and_abort_frees_blocks():
    engine = make_engine()
    prompts = random_prompts(3, 10, 20)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt, SamplingParams(temperature=0.0, max_tokens=50))
    engine.step()
    engine.step()
    used = engine.kv.num_blocks - engine.kv.num_free_blocks
    aborted = engine.abort_request("r1")
    assert aborted.finished and aborted.outputs[0].finish_reason == "abort"
    assert engine.kv.num_blocks - engine.kv.num_free_blocks < used
    assert engine.abort_request("r1") is None
    finished = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            assert output.request_id != "r1"
            if output.finished:
                finished[output.request_id] = output
    assert sorted(finished) == ["r0", "r2"]
    assert all(len(o.outputs[0].token_ids) == 50 for o in finished.values())
    assert "r1" in engine.executor.steps[2].finished_req_ids
    assert_all_free(engine)


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


def test_n_children_share_prefix_and_use_consecutive_seeds():
    prompt = random_prompts(1, 21, 21)[0]
    engine = make_engine(block_size=4)
    llm = LLM.from_engine(engine)
    params = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=8)
    out = llm.generate([prompt], params)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert out.num_cached_tokens == 2 * 20
    for i, completion in enumerate(out.outputs):
        single = LLM.from_engine(make_engine()).generate(
            [prompt], SamplingParams(temperature=1.0, seed=7 + i, max_tokens=8))[0]
        assert completion.token_ids == single.outputs[0].token_ids
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1
    assert_all_free(engine)


def test_max_tokens_and_max_model_len_limit_length():
    engine = make_engine(max_model_len=20)
    llm = LLM.from_engine(engine)
    prompts = random_prompts(2, 15, 15)
    out = llm.generate(prompts, [SamplingParams(temperature=0.0, max_tokens=3),
                                 SamplingParams(temperature=0.0, max_tokens=50)])
    assert [len(o.outputs[0].token_ids) for o in out] == [3, 5]
    assert all(o.outputs[0].finish_reason == "length" for o in out)
    assert_all_free(engine)


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


def test_duplicate_request_id_is_rejected():
    engine = make_engine()
    engine.add_request("a", [1, 2, 3])
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("a", [4, 5])
    engine.abort_request("a")
    assert_all_free(engine)


def test_logprobs_are_reported_when_asked():
    out = LLM.from_engine(make_engine()).generate(
        [[3, 4, 5]], SamplingParams(temperature=0.0, max_tokens=4, logprobs=2))[0].outputs[0]
    assert len(out.logprobs) == 4
    assert all(set(lp) >= {0, 1, tok} for lp, tok in zip(out.logprobs, out.token_ids))
    assert out.cumulative_logprob == pytest.approx(-2.0)


def test_logprobs_beyond_the_vocabulary_are_refused_and_the_engine_keeps_serving():
    engine = make_engine()
    llm = LLM.from_engine(engine)
    prompt, other = random_prompts(2, 3, 10)
    engine.add_request("running", other, GREEDY)
    engine.step()
    too_many = VOCAB + random.choice([1, random.randint(2, 10**12)])
    params = SamplingParams(temperature=0.0, max_tokens=3, logprobs=too_many)
    with pytest.raises(ValueError, match=f"logprobs={too_many} is invalid: must be None or "
                                         f"at most {VOCAB}, the model's vocabulary size"):
        llm.generate([prompt], params)
    # Params changed after encode_prompt are checked again when the ids come with them.
    params.logprobs = VOCAB
    _, ids = engine.encode_prompt(prompt, params)
    params.logprobs = too_many
    with pytest.raises(ValueError, match=f"logprobs={too_many}"):
        engine.add_request("late", prompt, params, prompt_token_ids=ids)
    finished = []
    while engine.has_unfinished_requests():
        finished += [o for o in engine.step() if o.finished]
    assert [(o.request_id, len(o.outputs[0].token_ids)) for o in finished] == [("running", 12)]
    params.logprobs = VOCAB
    whole, = llm.generate([prompt], params)
    assert [len(lp) for lp in whole.outputs[0].logprobs] == [VOCAB] * 3
    assert_all_free(engine)


def test_a_prompt_with_a_lone_surrogate_is_refused_naming_it(tiny_chat_model):
    llm = LLM(tiny_chat_model, device="cpu")
    at = random.randint(0, 5)
    text = "hello!"[:at] + chr(random.randint(0xD800, 0xDFFF)) + "hello!"[at:]
    with pytest.raises(ValueError, match=f"prompt holds .* at index {at}, a lone UTF-16 "
                                         "surrogate"):
        llm.generate([text], SamplingParams(max_tokens=2))
    assert len(llm.generate(["hello"], SamplingParams(max_tokens=2))[0].outputs[0].token_ids) == 2
    llm.shutdown()


def pace_steps(engine, request_id: str, step_s: float = 0.0) -> threading.Event:
    """Hold the engine's steps once `request_id` has 3 output tokens until the returned
    event is set (at most 10 s), then let each take `step_s`: the fake model is fast enough
    to finish a request before an asyncio consumer gets to act on it."""
    released = threading.Event()
    send = engine.executor.execute_model

    def paced(scheduled, non_block=False):
        seq = engine.scheduler.seqs.get(request_id)
        if seq is not None and seq.num_output_tokens >= 3:
            released.wait(10.0)
            time.sleep(step_s)
        return send(scheduled, non_block)

    engine.executor.execute_model = paced
    return released


def test_async_llm_streams_and_cancels():
    engine = make_engine()
    llm = AsyncLLM.from_engine(engine)
    prompts = random_prompts(3, 5, 15)
    expected = LLM.from_engine(make_engine()).generate(prompts, GREEDY)
    # The fake model is so fast that the engine could finish the cancelled request (100
    # tokens) before its consumer reads its third output: steps wait for that read.
    cancelling = pace_steps(engine, "c")

    async def collect(i):
        seen = []
        async for output in llm.generate(prompts[i], GREEDY, f"s{i}"):
            seen.append(output)
        return seen

    async def cancelled():
        # Closed on the way out: after a bare break the garbage collector closes the stream,
        # and its abort can come after asyncio.run has returned.
        async with contextlib.aclosing(llm.generate(prompts[0], SamplingParams(max_tokens=100),
                                                    "c")) as stream:
            async for output in stream:
                if len(output.outputs[0].token_ids) == 3:
                    cancelling.set()
                    break

    async def main():
        return await asyncio.gather(*(collect(i) for i in range(3)), cancelled())

    *streams, _ = asyncio.run(main())
    for stream, ref in zip(streams, expected):
        lengths = [len(o.outputs[0].token_ids) for o in stream]
        assert lengths == list(range(1, 13))
        assert stream[-1].finished and not any(o.finished for o in stream[:-1])
        assert stream[-1].outputs[0].token_ids == ref.outputs[0].token_ids
    assert engine.step_metrics.finished["abort"] == 1
    assert_all_free(engine)


def test_async_llm_cancelled_consumer_aborts_its_request():
    engine = make_engine()
    llm = AsyncLLM.from_engine(engine)
    seen = []
    # The fake model is so fast that the request could finish, and its consumer read every
    # output without yielding, before the cancel (the test failed about 1 run in 25): once
    # the request has 3 tokens, steps wait for the cancel, then take 20 ms each, so that its
    # abort (posted when the event loop next runs the stream) arrives long before the last.
    cancelled = pace_steps(engine, "c", step_s=0.02)

    async def consume():
        async for output in llm.generate([5, 6, 7], SamplingParams(max_tokens=100), "c"):
            seen.append(output)

    async def main():
        task = asyncio.create_task(consume())
        while len(seen) < 3:
            await asyncio.sleep(0)
        assert not seen[-1].finished
        task.cancel()
        cancelled.set()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not engine.has_unfinished_requests()

    asyncio.run(main())
    assert engine.step_metrics.finished["abort"] == 1
    assert_all_free(engine)


def test_async_llm_bad_request_raises_for_that_stream_only():
    engine = make_engine()
    llm = AsyncLLM.from_engine(engine)

    async def run(prompt, request_id):
        return [o async for o in llm.generate(prompt, GREEDY, request_id)]

    async def main():
        return await asyncio.gather(run([1, 2, 3], "ok"), run([], "bad"), return_exceptions=True)

    good, bad = asyncio.run(main())
    assert good[-1].finished and len(good[-1].outputs[0].token_ids) == 12
    assert isinstance(bad, ValueError) and "empty" in str(bad)
    assert_all_free(engine)


def test_prompt_over_budget_without_chunked_prefill_is_refused():
    engine = make_engine(max_num_batched_tokens=8, max_num_seqs=8, enable_chunked_prefill=False)
    with pytest.raises(ValueError, match="max_num_batched_tokens=8.*enable_chunked_prefill"):
        engine.add_request("long", list(range(1, 10)), GREEDY)
    engine.add_request("short", list(range(1, 9)), GREEDY)
    while engine.has_unfinished_requests():
        engine.step()
    assert_all_free(engine)


def test_async_llm_keeps_the_event_loop_free_during_steps(monkeypatch):
    engine = make_engine()
    real_step = engine.step

    def slow_step():
        time.sleep(0.02)
        return real_step()
    monkeypatch.setattr(engine, "step", slow_step)
    llm = AsyncLLM.from_engine(engine)
    ticks = []

    async def ticker(done: asyncio.Event):
        while not done.is_set():
            ticks.append(time.monotonic())
            await asyncio.sleep(0.001)

    async def main():
        done = asyncio.Event()
        tick_task = asyncio.create_task(ticker(done))
        outputs = [o async for o in llm.generate([1, 2, 3], GREEDY, "r")]
        done.set()
        await tick_task
        return outputs

    outputs = asyncio.run(main())
    assert outputs[-1].finished and len(outputs) == 12
    assert len(ticks) > 2 * len(outputs), "the event loop was blocked while the engine stepped"


def test_async_llm_step_failure_ends_streams_and_refuses_new_requests(monkeypatch):
    engine = make_engine()
    llm = AsyncLLM.from_engine(engine)

    def broken_step():
        raise RuntimeError("worker lost")
    monkeypatch.setattr(engine, "step", broken_step)

    async def run(request_id):
        return [o async for o in llm.generate([1, 2, 3], GREEDY, request_id)]

    with pytest.raises(RuntimeError, match="worker lost"):
        asyncio.run(run("first"))
    with pytest.raises(RuntimeError, match="accepts no more requests"):
        asyncio.run(run("second"))


def test_random_workload_keeps_invariants_and_matches_reference(fresh_seed):
    rng = random.Random(fresh_seed)
    block_size = rng.choice([1, 2, 4, 8])
    budget = rng.randint(4, 40)
    engine = make_engine(num_blocks=-(-56 // block_size) + rng.randint(0, 24),
                         block_size=block_size, max_num_seqs=rng.randint(1, min(8, budget)),
                         max_num_batched_tokens=budget,
                         enable_prefix_caching=rng.random() < 0.7)
    stems = random_prompts(3, 1, 20)
    requests = {}
    for i in range(30):
        prompt = rng.choice(stems)[:rng.randint(1, 20)] + random_prompts(1, 1, 10)[0]
        n = rng.randint(1, 2)
        requests[f"q{i}"] = (prompt, SamplingParams(n=n, temperature=0.0,
                                                    max_tokens=rng.randint(1, 20)))
    pending, finished = list(requests), {}
    while pending or engine.has_unfinished_requests():
        if pending and rng.random() < 0.5:
            request_id = pending.pop(0)
            engine.add_request(request_id, *requests[request_id])
        live = sorted(engine.outputs.requests)
        if live and rng.random() < 0.05:
            assert engine.abort_request(rng.choice(live)).finished
        for output in engine.step():
            if output.finished:
                finished[output.request_id] = output
        engine.kv.check_invariants()
    assert_all_free(engine)
    reference = LLM.from_engine(make_engine(num_blocks=64, block_size=4))
    for request_id, output in finished.items():
        prompt, params = requests[request_id]
        assert token_ids([output]) == token_ids(reference.generate([prompt], params))

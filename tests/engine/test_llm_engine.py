"""The engine end to end over the checking fake worker (tests/engine/fake_model.py): the
same tokens however requests are batched, chunked, cached, preempted or sampled with seeds.
Stops and lengths are in test_llm_engine_outputs.py, refused requests in
test_llm_engine_refusals.py, aborts and AsyncLLM streams in test_llm_engine_streams.py."""

import random

import pytest

from fake_engine_checks import GREEDY, assert_all_free, token_ids
from fake_model import make_engine, random_prompts
from shardline.engine.llm import LLM
from shardline.sampling_params import SamplingParams

pytestmark = pytest.mark.usefixtures("seeded_random")


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

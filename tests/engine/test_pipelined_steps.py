"""The engine with several steps in flight, as under pipeline parallelism: the same tokens
as one step at a time, no sequence in two steps at once, and aborts that arrive while a
sequence's step is in flight applied when it returns (its KV blocks held until then)."""

import pytest

from fake_engine_checks import assert_all_free, token_ids
from fake_model import make_engine, random_prompts, run_to_the_end
from shardline.engine.llm import LLM
from shardline.sampling_params import SamplingParams


pytestmark = pytest.mark.usefixtures("seeded_random")


@pytest.mark.parametrize("depth", [2, 3])
@pytest.mark.parametrize("pressure", ["roomy", "preempting", "chunked"])
def test_pipelined_steps_give_the_same_tokens(depth, pressure):
    prompts = random_prompts(10, 2, 30)
    params = [SamplingParams(temperature=0.0 if i % 2 else 0.9, seed=i, max_tokens=16)
              for i in range(len(prompts))]
    # 40 blocks force preemptions, yet hold enough sequences at once to fill `depth` steps:
    # with 24, long prompts left too few running to fill 3 (one run in 35 at depth 3);
    # 40 missed neither in 20000 seeded runs of each depth.
    limits = {"roomy": {}, "preempting": {"num_blocks": 40},
              "chunked": {"max_num_batched_tokens": 16, "max_num_seqs": 8}}[pressure]
    reference = LLM.from_engine(make_engine(**limits)).generate(prompts, params)
    engine = make_engine(pipeline_depth=depth, **limits)
    send = engine.executor.execute_model
    max_in_flight = 0

    def checked_send(scheduled, non_block=False):
        nonlocal max_in_flight
        busy = set().union(*(s.num_scheduled_tokens for s, _ in engine._in_flight))
        assert not busy & set(scheduled.num_scheduled_tokens), "a sequence in two steps"
        max_in_flight = max(max_in_flight, len(engine._in_flight) + 1)
        return send(scheduled, non_block)

    engine.executor.execute_model = checked_send
    outputs = LLM.from_engine(engine).generate(prompts, params)
    assert token_ids(outputs) == token_ids(reference)
    assert max_in_flight == depth
    if pressure == "preempting":
        assert engine.stats.num_preemptions > 0
    assert_all_free(engine)


def test_steps_are_kept_in_flight_up_to_the_pipeline_depth():
    engine = make_engine(pipeline_depth=3)
    for i, prompt in enumerate(random_prompts(9, 4, 8)):
        engine.add_request(f"r{i}", prompt, SamplingParams(temperature=0.0, max_tokens=4))
    engine.step()
    # Three steps were sent, each with a third of the sequences; the first has returned.
    assert len(engine.executor.steps) == 3
    assert [len(s.num_scheduled_tokens) for s in engine.executor.steps] == [3, 3, 3]
    assert len(engine._in_flight) == 2


def test_abort_while_the_step_is_in_flight_is_applied_when_it_returns():
    engine = make_engine(pipeline_depth=2)
    prompts = random_prompts(4, 6, 12)
    params = SamplingParams(temperature=0.0, max_tokens=20)
    alone = [LLM.from_engine(make_engine()).generate([p], params)[0] for p in prompts]
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt, params)
    engine.step()
    in_flight = set(engine._in_flight[0][0].num_scheduled_tokens)
    victim = sorted(in_flight)[0]
    used = engine.kv.num_blocks - engine.kv.num_free_blocks
    aborted = engine.abort_request(victim)
    assert aborted.finished and aborted.outputs[0].finish_reason == "abort"
    # The step in flight still reads the victim's KV blocks: they are not freed yet.
    assert engine.kv.num_blocks - engine.kv.num_free_blocks == used
    finished = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            assert output.request_id != victim
            if output.finished:
                finished[output.request_id] = output
    survivors = [f"r{i}" for i in range(4) if f"r{i}" != victim]
    assert sorted(finished) == survivors
    for rid in survivors:
        assert finished[rid].outputs[0].token_ids == alone[int(rid[1:])].outputs[0].token_ids
    assert any(victim in s.finished_req_ids for s in engine.executor.steps)
    assert_all_free(engine)


OUTGROWING = dict(num_blocks=24, block_size=1, max_num_seqs=2, max_num_batched_tokens=4,
                  enable_prefix_caching=False)


@pytest.mark.parametrize("depth", [2, 3])
def test_prefills_that_outgrow_the_cache_together_still_finish(depth):
    """Chunked prefills that each need nearly the whole cache, one per step: one that runs out
    of blocks while the other is in flight must wait for it, not preempt itself (readmitted,
    it took the blocks the other needed, and they preempted each other forever)."""
    prompts = random_prompts(5, 20, 23)
    params = [SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)] * len(prompts)
    limits = dict(OUTGROWING, max_model_len=64)
    expected = LLM.from_engine(make_engine(**limits)).generate(prompts, params)
    engine = make_engine(pipeline_depth=depth, **limits)
    finished = run_to_the_end(engine, prompts, params)
    assert token_ids([finished[f"r{i}"] for i in range(len(prompts))]) == token_ids(expected)
    assert engine.stats.num_preemptions > 0
    assert_all_free(engine)


@pytest.mark.parametrize("depth", [2, 3])
def test_siblings_that_outgrow_the_cache_together_still_finish(depth):
    """The fuzz case that livelocked: three siblings of a prompt that nearly fills the cache
    and two of a shorter one, two running at a time."""
    prompts = [random_prompts(1, 23, 23)[0], random_prompts(1, 18, 18)[0]]
    params = [SamplingParams(n=3, temperature=0.0, max_tokens=2, ignore_eos=True),
              SamplingParams(n=2, temperature=0.0, max_tokens=1, ignore_eos=True)]
    limits = dict(OUTGROWING, max_model_len=32)
    expected = LLM.from_engine(make_engine(**limits)).generate(prompts, params)
    engine = make_engine(pipeline_depth=depth, **limits)
    finished = run_to_the_end(engine, prompts, params)
    assert token_ids([finished["r0"], finished["r1"]]) == token_ids(expected)
    assert_all_free(engine)

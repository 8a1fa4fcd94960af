"""Async scheduling: the engine sends step N+1 before it has seen step N's tokens, and a
decoding sequence may be in both (the worker reads its last token from its own earlier
samples). The outputs must be exactly those of one step at a time, whatever ends the
sequences (EOS, stop tokens and strings, max_tokens, max_model_len, aborts), under
preemption and chunked prefill, and every KV block must come back."""

import random
from types import SimpleNamespace

import pytest

from fake_engine_checks import assert_all_free
from fake_model import VOCAB, make_engine, random_prompts, run_to_the_end
from shardline.config import (CacheConfig, EngineConfig, ModelConfig, ParallelConfig,
                              SchedulerConfig)
from shardline.engine.llm import LLM
from shardline.engine.llm_engine import uses_async_scheduling
from shardline.sampling_params import SamplingParams


pytestmark = pytest.mark.usefixtures("seeded_random")


def completions(outputs):
    return [[(c.token_ids, c.text, c.finish_reason, c.stop_reason) for c in o.outputs]
            for o in outputs]


def watch_steps(engine) -> dict:
    """Count the steps sent, those with a sequence already in a step in flight, and the
    prompt chunks sent while the chunk before them was in flight."""
    seen = {"steps": 0, "ahead": 0, "chunks_ahead": 0, "max_in_flight": 0}
    send = engine.executor.execute_model

    def watched(scheduled, non_block=False):
        busy = set().union(*(s.num_scheduled_tokens for s, _ in engine._in_flight))
        ahead = [engine.scheduler.seqs[s] for s in busy & set(scheduled.num_scheduled_tokens)]
        seen["steps"] += 1
        seen["ahead"] += bool(ahead)
        # A chunk ahead ends within the known tokens, a decode ahead one token past them.
        seen["chunks_ahead"] += sum(s.num_computed_tokens + s.num_tokens_in_flight
                                    <= s.num_tokens for s in ahead)
        seen["max_in_flight"] = max(seen["max_in_flight"], len(engine._in_flight) + 1)
        return send(scheduled, non_block)

    engine.executor.execute_model = watched
    return seen


def run_both_ways(prompts, params, **limits):
    """Generate one step at a time, then scheduling ahead; the outputs must be equal.
    Returns the outputs, the engine that scheduled ahead, and what watch_steps saw."""
    expected = LLM.from_engine(make_engine(async_scheduling=False, **limits)
                               ).generate(prompts, params)
    engine = make_engine(async_scheduling=True, **limits)
    seen = watch_steps(engine)
    outputs = LLM.from_engine(engine).generate(prompts, params)
    assert completions(outputs) == completions(expected)
    return outputs, engine, seen


def mixed_params(count: int) -> list[SamplingParams]:
    """Greedy and seeded sampling, ended by EOS (token 0), stop tokens, stop strings,
    max_tokens or the model length, some with logprobs and some with penalties."""
    params = []
    for i in range(count):
        params.append(SamplingParams(
            temperature=0.0 if i % 2 else 0.9, seed=i, max_tokens=random.randint(1, 24),
            stop_token_ids=[random.randrange(1, VOCAB)] if i % 3 == 0 else [],
            stop=["q"] if i % 4 == 1 else [], logprobs=2 if i % 5 == 0 else None,
            frequency_penalty=0.5 if i % 7 == 3 else 0.0))
    return params


@pytest.mark.parametrize("pressure", ["roomy", "preempting", "chunked"])
def test_async_scheduling_gives_the_same_outputs(pressure):
    prompts = random_prompts(12, 2, 30)
    params = mixed_params(len(prompts))
    limits = {"roomy": {}, "preempting": {"num_blocks": 40},
              "chunked": {"max_num_batched_tokens": 16, "max_num_seqs": 8}}[pressure]
    _, engine, seen = run_both_ways(prompts, params, eos_token_ids=(0,), max_model_len=48,
                                    **limits)
    assert seen["max_in_flight"] == 2 and seen["ahead"] > 0
    assert seen["chunks_ahead"] > 0 or pressure != "chunked"
    assert_all_free(engine)


def test_a_prompt_sends_its_next_chunk_while_the_one_before_runs():
    budget = random.randint(3, 8)
    prompt = random_prompts(1, 5 * budget, 9 * budget)[0]
    params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    _, engine, seen = run_both_ways([prompt], params, max_num_batched_tokens=budget,
                                    max_num_seqs=1, num_blocks=128,
                                    block_size=random.choice([1, 4, 8]))
    # Every chunk but the first is sent while the one before is in flight, in order.
    num_chunks = -(-len(prompt) // budget)
    chunks = engine.executor.steps[:num_chunks]
    starts = [[*s.new_requests, *s.cached_requests][0].num_computed_tokens for s in chunks]
    assert starts == list(range(0, len(prompt), budget))
    assert seen["chunks_ahead"] == num_chunks - 1
    assert_all_free(engine)


@pytest.mark.parametrize("pressure", ["siblings", "preempting"])
def test_chunks_going_ahead_give_the_same_outputs(pressure):
    """Long prompts in small chunks, some sharing a prefix, n > 1 (siblings wait for the
    leader's prompt blocks), or a cache too small for them all (preemption)."""
    shared = random_prompts(1, 8, 20)[0]
    prompts = [shared * (i % 2) + p for i, p in enumerate(random_prompts(8, 10, 40))]
    params = mixed_params(len(prompts))
    for i, p in enumerate(params):
        p.n = 1 + i % 3 if pressure == "siblings" else 1
    # 16 blocks of 4 hold two sequences of 32 tokens: the longest outgrow it together.
    outputs, engine, seen = run_both_ways(
        prompts, params, max_num_batched_tokens=random.randint(8, 12), max_num_seqs=8,
        max_model_len=64, num_blocks=512 if pressure == "siblings" else 16, eos_token_ids=(0,))
    assert seen["chunks_ahead"] > 0
    if pressure == "siblings":  # each sibling reuses the leader's full prompt blocks
        for prompt, p, out in zip(prompts, params, outputs):
            assert out.num_cached_tokens >= (p.n - 1) * ((len(prompt) - 1) // 4 * 4)
    else:
        assert engine.stats.num_preemptions > 0
    assert_all_free(engine)


def test_a_decoding_sequence_goes_one_step_ahead():
    engine = make_engine(async_scheduling=True)
    engine.add_request("r", random_prompts(1, 5, 9)[0],
                       SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True))
    seen = watch_steps(engine)
    while engine.has_unfinished_requests():
        engine.step()
    # The prefill samples token 1; tokens 1..5 are each decoded by a step sent before the
    # engine saw the token it reads. Token 6 ends the sequence by length: nothing goes
    # ahead of the step that samples it, so no token is computed in vain.
    steps = engine.executor.steps
    assert [s.total_num_scheduled_tokens for s in steps[1:]] == [1] * 5
    assert seen["ahead"] == 5
    assert engine.stats.num_computed_tokens == steps[0].total_num_scheduled_tokens + 5
    assert_all_free(engine)


def test_a_step_ahead_of_a_stop_computes_one_token_that_is_dropped():
    # Room for every sequence at once (no preemption, whose recompute would count too),
    # and stop tokens common enough (5 of 97) that most sequences stop before max_tokens.
    roomy = dict(num_blocks=256, eos_token_ids=(0,))
    reference = make_engine(async_scheduling=False, **roomy)
    prompts = random_prompts(6, 3, 12)
    params = SamplingParams(temperature=0.9, seed=random.randrange(1000), max_tokens=60,
                            stop_token_ids=[1, 2, 3, 4])
    expected = LLM.from_engine(reference).generate(prompts, params)
    engine = make_engine(async_scheduling=True, **roomy)
    outputs = LLM.from_engine(engine).generate(prompts, params)
    assert completions(outputs) == completions(expected)
    # A sequence whose stop token is also its max_tokens-th has no step ahead of it.
    stopped = sum(o.outputs[0].finish_reason == "stop"
                  and len(o.outputs[0].token_ids) < params.max_tokens for o in expected)
    assert stopped > 0 and engine.stats.num_preemptions == 0
    assert (engine.stats.num_computed_tokens - reference.stats.num_computed_tokens
            == stopped)
    assert_all_free(engine)


@pytest.mark.parametrize("count", [2, 3])
def test_prefills_that_outgrow_the_cache_together_still_finish(count):
    """Chunked prefills whose sequences cannot all fit: one preempted while another is in
    flight must not come back and take the blocks that one needs (they would preempt each
    other forever). The outputs must still be those of one step at a time."""
    limits = dict(num_blocks=24, block_size=1, max_num_seqs=count, max_num_batched_tokens=4,
                  max_model_len=64, enable_prefix_caching=False)
    # Each needs nearly the whole cache (at most 23 + 2 - 1 tokens of KV of 24); the
    # first always outgrows it beside the second chunk-sized prompt the budget admits.
    prompts = random_prompts(count, 21, 23)
    params = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)
    expected = LLM.from_engine(make_engine(async_scheduling=False, **limits)
                               ).generate(prompts, params)
    engine = make_engine(async_scheduling=True, **limits)
    finished = run_to_the_end(engine, prompts, [params] * count)
    assert len(finished) == count
    assert completions([finished[f"r{i}"] for i in range(count)]) == completions(expected)
    assert engine.stats.num_preemptions > 0
    assert_all_free(engine)


def test_penalized_sequences_wait_for_their_tokens():
    engine = make_engine(async_scheduling=True)
    engine.add_request("p", random_prompts(1, 4, 8)[0],
                       SamplingParams(temperature=0.0, max_tokens=5, presence_penalty=1.0))
    seen = watch_steps(engine)
    while engine.has_unfinished_requests():
        engine.step()
    assert seen["ahead"] == 0 and seen["max_in_flight"] == 1
    assert_all_free(engine)


@pytest.mark.parametrize("phase", ["decoding", "prefilling"])
def test_abort_of_a_sequence_in_two_steps_frees_its_blocks_after_both(phase):
    # Prefilling: a budget of 16 tokens computes the first prompt in chunks, two in flight.
    engine = make_engine(async_scheduling=True, max_num_batched_tokens=16)
    low, high = (6, 12) if phase == "decoding" else (40, 60)
    prompts = random_prompts(3, low, high)
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    alone = [LLM.from_engine(make_engine()).generate([p], params)[0] for p in prompts]
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt, params)
    engine.send_steps()
    r0 = engine.scheduler.seqs["r0"]
    for _ in range(50):
        # Prefilling: both steps compute a chunk short of the prompt's end.
        now = ("prefilling" if r0.num_computed_tokens + r0.num_tokens_in_flight < r0.num_tokens
               else "decoding" if not r0.is_prefilling else "last chunk")
        if engine.scheduler._in_flight["r0"] == 2 and now == phase:
            break
        engine.collect_step()
        engine.send_steps()
    else:
        pytest.fail(f"r0 was never in two steps while {phase}")
    used = engine.kv.num_blocks - engine.kv.num_free_blocks
    assert engine.abort_request("r0").outputs[0].finish_reason == "abort"
    assert engine.kv.num_blocks - engine.kv.num_free_blocks == used
    engine.collect_step()  # the first step back: the second still reads r0's blocks
    assert engine.kv.num_blocks - engine.kv.num_free_blocks == used
    assert engine.scheduler._in_flight["r0"] == 1
    engine.collect_step()
    assert "r0" not in engine.scheduler._in_flight
    assert engine.kv.num_blocks - engine.kv.num_free_blocks < used
    finished = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            assert output.request_id != "r0"
            finished[output.request_id] = output
    for i in (1, 2):
        assert finished[f"r{i}"].outputs[0].token_ids == alone[i].outputs[0].token_ids
    assert_all_free(engine)


def test_async_scheduling_is_refused_with_a_pipeline_or_sequence_parallelism():
    base = dict(model=ModelConfig(model="fake"), cache=CacheConfig(),
                scheduler=SchedulerConfig(async_scheduling=True))
    for layout, name in ((dict(pipeline_parallel_size=2), "pipeline_parallel_size=2"),
                         (dict(sequence_parallel_size=2, tensor_parallel_size=2),
                          "sequence_parallel_size=2")):
        with pytest.raises(ValueError, match=f"async_scheduling=True needs one pipeline stage "
                                             f"and no sequence parallelism, but {name}"):
            EngineConfig(parallel=ParallelConfig(**layout), **base)
    for layout in (dict(data_parallel_size=2), dict(tensor_parallel_size=2)):
        EngineConfig(parallel=ParallelConfig(**layout), **base)
    for wrong in ("yes", 1, 0):
        with pytest.raises(ValueError, match="async_scheduling"):
            SchedulerConfig(async_scheduling=wrong)


@pytest.mark.parametrize("wanted", [None, True, False])
@pytest.mark.parametrize("hides", [True, False])
@pytest.mark.parametrize("layout", [{}, {"data_parallel_size": 2},
                                    {"tensor_parallel_size": 2}, {"pipeline_parallel_size": 2},
                                    {"sequence_parallel_size": 2}])
def test_the_default_is_on_where_host_time_can_hide(wanted, hides, layout):
    allowed = not layout.keys() & {"pipeline_parallel_size", "sequence_parallel_size"}
    if wanted and not allowed:
        return  # refused by the config (above)
    config = EngineConfig(model=ModelConfig(model="fake"), cache=CacheConfig(),
                          scheduler=SchedulerConfig(async_scheduling=wanted),
                          parallel=ParallelConfig(device="cpu", **layout))
    # On CPU ranks, tensor parallelism leaves it off unless asked for (see the docstring).
    pays = allowed and hides and "tensor_parallel_size" not in layout
    expected = pays if wanted is None else wanted
    executor = SimpleNamespace(hides_host_time=hides)
    assert uses_async_scheduling(config, executor) is expected


MODEL = "tiny-llama"


@pytest.fixture(scope="module")
def model_pair():
    """tiny-llama in process, one step at a time and scheduling ahead, same options."""
    # No prefix caching: a prompt run again would prefill from the cache, in other chunks.
    options = dict(block_size=4, num_kv_blocks=256, max_num_batched_tokens=32, max_num_seqs=8,
                   enable_prefix_caching=False)
    return LLM(MODEL, async_scheduling=False, **options), LLM(MODEL, async_scheduling=True,
                                                              **options)


def model_prompts(count: int) -> list[list[int]]:
    return [[random.randrange(3, 259) for _ in range(random.randint(2, 30))]
            for _ in range(count)]


def test_the_model_gives_the_same_tokens_and_logprobs_when_steps_go_ahead(model_pair):
    """Alone, a prompt runs batches of one in both modes, so the arithmetic is the same
    and so must be every token and logprob: greedy and seeded draws (whose draw index
    counts the token the worker has not been sent yet), ended by a stop token mid-way."""
    in_order, ahead = model_pair
    seen = watch_steps(ahead.engine)
    for prompt in model_prompts(3):
        for params in (SamplingParams(temperature=0.0, max_tokens=10, logprobs=2),
                       SamplingParams(temperature=0.8, seed=random.randrange(1 << 20),
                                      max_tokens=10, top_p=0.9, logprobs=1)):
            params.ignore_eos = True
            free_run = in_order.generate([prompt], params)[0].outputs[0].token_ids
            params.stop_token_ids = [free_run[5]]
            expected = in_order.generate([prompt], params)[0].outputs[0]
            got = ahead.generate([prompt], params)[0].outputs[0]
            stop_at = free_run.index(free_run[5])
            assert got.token_ids == expected.token_ids == free_run[:stop_at + 1]
            assert got.logprobs == expected.logprobs
            assert got.finish_reason == expected.finish_reason == "stop"
    assert seen["ahead"] > 0
    assert_all_free(ahead.engine)


def test_the_model_gives_the_same_tokens_when_prompt_chunks_go_ahead(model_pair):
    """A prompt of several chunks of 32 tokens alone: each chunk after the first is sent
    while the one before runs, in the same chunks as one step at a time, so every token
    and logprob must be the same."""
    in_order, ahead = model_pair
    seen = watch_steps(ahead.engine)
    prompts = [[random.randrange(3, 259) for _ in range(random.randint(70, 140))]
               for _ in range(2)]
    for prompt in prompts:
        params = SamplingParams(temperature=0.8, seed=random.randrange(1 << 20), max_tokens=6,
                                logprobs=2, ignore_eos=True)
        expected = in_order.generate([prompt], params)[0].outputs[0]
        got = ahead.generate([prompt], params)[0].outputs[0]
        assert (got.token_ids, got.logprobs) == (expected.token_ids, expected.logprobs)
    assert seen["chunks_ahead"] == sum(len(p) // 32 - (len(p) % 32 == 0) for p in prompts)
    assert_all_free(ahead.engine)


def test_a_batch_of_the_model_matches_when_steps_go_ahead(model_pair):
    """A batch whose sequences end at different steps (max_tokens): greedy tokens equal up
    to a near tie (the steps' batches differ once a sequence has ended)."""
    from near_ties import assert_greedy_match, outputs_run

    in_order, ahead = model_pair
    prompts = model_prompts(8)
    params = [SamplingParams(temperature=0.0, max_tokens=random.randint(1, 14), logprobs=2,
                             ignore_eos=True) for _ in prompts]
    seen = watch_steps(ahead.engine)
    assert_greedy_match(outputs_run(in_order.generate(prompts, params)),
                        outputs_run(ahead.generate(prompts, params)))
    assert seen["ahead"] > 0 and seen["max_in_flight"] == 2
    assert_all_free(ahead.engine)

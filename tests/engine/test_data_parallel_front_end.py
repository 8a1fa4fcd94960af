"""The data-parallel front end over cores of the checking fake worker (fake_model.py), in
process: routing to the least-loaded core, outputs in request order with the tokens of one
core, aborts and request ids across cores, dummy steps that keep the cores in step, a
failed core stopping the engine, and steps sent to every core before any is awaited. The same engine over real worker processes is tested in
test_data_parallel.py."""

import random

import pytest

from fake_model import VOCAB, make_engine
from shardline.engine.data_parallel import DataParallelEngine
from shardline.engine.llm import LLM
from shardline.executor import EngineDeadError
from shardline.sampling_params import SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)


def random_prompt(rng: random.Random, low: int = 1, high: int = 40) -> list[int]:
    return [rng.randrange(VOCAB) for _ in range(rng.randint(low, high))]


def make_dp(num_cores: int = 2, dummy_steps: bool = False, **options) -> DataParallelEngine:
    return DataParallelEngine([make_engine(**options) for _ in range(num_cores)], dummy_steps)


def core_of(engine: DataParallelEngine, request_id: str) -> int:
    [core] = [i for i, c in enumerate(engine.cores) if request_id in c.outputs.requests]
    return core


def held_tokens(engine: DataParallelEngine) -> list[int]:
    """Tokens of the waiting and running sequences of each core, counted afresh."""
    return [sum(s.num_tokens for s in core.scheduler.seqs.values()) for core in engine.cores]


def test_each_request_goes_to_the_core_holding_the_fewest_tokens(rng):
    """Requests join between steps, so the running ones have grown by their outputs: each
    new one must land on the core whose waiting plus running tokens are fewest."""
    engine = make_dp(num_cores=3, num_blocks=512, max_num_seqs=32, max_num_batched_tokens=256)
    for i in range(24):
        loads = held_tokens(engine)
        n = rng.choice([1, 1, 2])
        engine.add_request(f"r{i}", random_prompt(rng), SamplingParams(
            temperature=0.0, max_tokens=40, ignore_eos=True, n=n))
        assert core_of(engine, f"r{i}") == loads.index(min(loads)), (i, loads)
        if rng.random() < 0.5:
            engine.step()
    assert all(core.outputs.requests for core in engine.cores)


def test_generate_returns_outputs_in_request_order_with_one_cores_tokens(rng):
    prompts = [random_prompt(rng) for _ in range(9)]
    params = [GREEDY if i % 3 else SamplingParams(temperature=0.8, seed=rng.randrange(10**6),
                                                  max_tokens=6, ignore_eos=True)
              for i in range(len(prompts))]
    expected = LLM.from_engine(make_engine()).generate(prompts, params)
    engine = make_dp()
    got = LLM.from_engine(engine).generate(prompts, params)
    assert [o.prompt_token_ids for o in got] == prompts
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in expected]
    assert all(core.stats.num_steps > 0 for core in engine.cores)  # both cores served
    assert not engine.has_unfinished_requests()


def test_abort_reaches_the_core_that_runs_the_request_and_ids_are_unique_across_cores(rng):
    engine = make_dp()
    for i in range(4):
        engine.add_request(f"r{i}", random_prompt(rng, 5, 10), GREEDY)
    assert {core_of(engine, f"r{i}") for i in range(4)} == {0, 1}
    victim = next(f"r{i}" for i in range(4) if core_of(engine, f"r{i}") == 1)
    engine.step()
    with pytest.raises(ValueError, match=f"request_id='{victim}' is already in use"):
        engine.add_request(victim, random_prompt(rng), GREEDY)
    aborted = engine.abort_request(victim)
    assert aborted.finished and aborted.outputs[0].finish_reason == "abort"
    assert engine.abort_request(victim) is None
    assert engine.abort_request("unknown") is None
    finished = {}
    while engine.has_unfinished_requests():
        finished.update({o.request_id: o for o in engine.step() if o.finished})
    assert set(finished) == {f"r{i}" for i in range(4)} - {victim}
    for core in engine.cores:
        core.kv.check_invariants()
        assert core.kv.num_free_blocks == core.kv.num_blocks
    engine.add_request(victim, random_prompt(rng), GREEDY)  # the id is free again


@pytest.mark.parametrize("depth", [1, 2])
def test_dummy_steps_keep_an_idle_core_in_step(rng, depth):
    """One request on a 2-core engine: with dummy steps the idle core runs an empty step
    for every step of the busy one; without, it runs nothing."""
    for dummy_steps in (True, False):
        engine = make_dp(dummy_steps=dummy_steps, pipeline_depth=depth)
        out = LLM.from_engine(engine).generate([random_prompt(rng, 20, 30)], GREEDY)
        assert len(out[0].outputs[0].token_ids) == 6
        busy, idle = sorted((c.executor.steps for c in engine.cores), key=len, reverse=True)
        assert all(not step.is_empty for step in busy)
        if dummy_steps:
            assert len(idle) == len(busy) == engine.num_dummy_steps
            assert all(step.is_empty for step in idle)
        else:
            assert idle == [] and engine.num_dummy_steps == 0
        assert engine.stats.num_steps == len(busy)


def test_a_failed_core_stops_the_engine(rng, monkeypatch):
    engine = make_dp()
    for i in range(2):
        engine.add_request(f"r{i}", random_prompt(rng), GREEDY)
    engine.step()
    dead = EngineDeadError("worker rank 1 (pid 1) died with exit code -9")

    def die(*args, **kwargs):
        raise dead

    monkeypatch.setattr(engine.cores[1].executor, "execute_model", die)
    for _ in range(2):
        with pytest.raises(EngineDeadError) as raised:
            engine.step()
        assert raised.value is dead


def test_a_step_sends_to_every_core_before_waiting_for_any(rng):
    """The cores compute at once: each front-end step sends every core's work first and
    only then waits for the cores' results, core by core."""
    engine = make_dp(num_cores=3)
    events = []
    for i, core in enumerate(engine.cores):
        for name in ("send_steps", "collect_step"):
            method = getattr(core, name)

            def logged(method=method, event=(name, i)):
                events.append(event)
                return method()

            setattr(core, name, logged)
    for i in range(3):
        engine.add_request(f"r{i}", random_prompt(rng), GREEDY)
    engine.step()
    assert events == [("send_steps", 0), ("send_steps", 1), ("send_steps", 2),
                      ("collect_step", 0), ("collect_step", 1), ("collect_step", 2)]

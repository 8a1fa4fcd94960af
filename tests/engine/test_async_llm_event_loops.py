"""AsyncLLM over the checking fake worker from more than one event loop: a second loop after
the first, two loops at once, and a loop closed under an open stream, whose request is
aborted. Every wait is bounded, so a regression fails instead of hanging."""

import asyncio
from concurrent.futures import ThreadPoolExecutor

from async_llm_helpers import (TIMEOUT, StepGate, collect, greedy, random_prompt,
                               reference_tokens, wait_idle)
from fake_engine_checks import assert_all_free
from fake_model import make_engine
from shardline.engine.async_llm import AsyncLLM


def test_requests_arriving_during_a_step_work_from_a_second_event_loop(rng, monkeypatch):
    engine = make_engine()
    gate = StepGate(engine, monkeypatch)
    llm = AsyncLLM.from_engine(engine)
    params = greedy(8)

    async def run_pair(prompts):
        gate.hold()
        first = asyncio.create_task(collect(llm.generate(prompts[0], params, "a")))
        await gate.held()
        second = asyncio.create_task(collect(llm.generate(prompts[1], params, "b")))
        await asyncio.sleep(0.01)
        gate.release.set()
        return await asyncio.wait_for(asyncio.gather(first, second), TIMEOUT)

    for _ in range(2):
        prompts = [random_prompt(rng), random_prompt(rng)]
        streams = asyncio.run(run_pair(prompts))
        for prompt, stream in zip(prompts, streams):
            assert stream[-1].outputs[0].token_ids == reference_tokens(prompt, params)
        wait_idle(engine)
        assert_all_free(engine)


def test_streams_on_two_event_loops_at_once(rng):
    engine = make_engine()
    llm = AsyncLLM.from_engine(engine)
    prompts = [random_prompt(rng) for _ in range(8)]
    params = greedy(10)

    async def run_half(half: int):
        ids = range(half, len(prompts), 2)
        streams = [collect(llm.generate(prompts[i], params, f"r{i}")) for i in ids]
        return dict(zip(ids, await asyncio.wait_for(asyncio.gather(*streams), TIMEOUT)))

    with ThreadPoolExecutor(2) as pool:
        halves = list(pool.map(lambda half: asyncio.run(run_half(half)), (0, 1)))
    results = halves[0] | halves[1]
    for i, prompt in enumerate(prompts):
        assert results[i][-1].outputs[0].token_ids == reference_tokens(prompt, params)
    wait_idle(engine)
    assert_all_free(engine)


def test_stream_whose_event_loop_closed_is_aborted(rng, monkeypatch):
    engine = make_engine()
    gate = StepGate(engine, monkeypatch)
    llm = AsyncLLM.from_engine(engine)
    gate.hold(at_step=1)
    loop = asyncio.new_event_loop()
    orphan = llm.generate(random_prompt(rng), greedy(200), "orphan")
    loop.run_until_complete(asyncio.wait_for(orphan.__anext__(), TIMEOUT))
    loop.close()  # without closing the stream
    gate.release.set()
    prompt = random_prompt(rng)
    outputs = asyncio.run(asyncio.wait_for(collect(llm.generate(prompt, greedy(6), "next")),
                                           TIMEOUT))
    assert outputs[-1].outputs[0].token_ids == reference_tokens(prompt, greedy(6))
    wait_idle(engine)
    steps_with_orphan = [i for i, step in enumerate(engine.executor.steps)
                         if "orphan" in step.num_scheduled_tokens]
    assert steps_with_orphan == [0, 1]
    assert_all_free(engine)
    asyncio.run(orphan.aclose())

"""A request id is free again as soon as its request has finished or been aborted, even
while a step in flight still holds its sequence: under async scheduling the step sent
ahead of a stop token, under pipelining (or async) the step of an aborted sequence. The
new request waits for that step and must then give the tokens it gives alone."""

import asyncio
import random
import time

import pytest

from async_llm_helpers import wait_idle
from fake_engine_checks import assert_all_free
from fake_model import make_engine, random_prompts
from shardline.engine.async_llm import AsyncLLM
from shardline.engine.llm import LLM
from shardline.sampling_params import SamplingParams


pytestmark = pytest.mark.usefixtures("seeded_random")


STEPS = {"async": dict(async_scheduling=True), "pipelined": dict(pipeline_depth=2)}


def alone(prompt, params):
    return LLM.from_engine(make_engine()).generate([prompt], params)[0].outputs[0].token_ids


def stopping_request():
    """A prompt, and greedy params that stop on its 4th generated token: the step ahead of
    that token (under async scheduling) then still holds the sequence when it finishes. A
    prompt whose 4th token comes earlier too (the fake model may repeat one) is redrawn."""
    while True:
        prompt = random_prompts(1, 4, 10)[0]
        free_run = alone(prompt, SamplingParams(temperature=0.0, max_tokens=8,
                                                ignore_eos=True))
        if free_run[3] not in free_run[:3]:
            return prompt, SamplingParams(temperature=0.0, max_tokens=50, ignore_eos=True,
                                          stop_token_ids=[free_run[3]])


@pytest.mark.parametrize("steps, ended_by", [("async", "stop"), ("async", "abort"),
                                             ("pipelined", "abort")])
def test_an_id_held_by_a_step_in_flight_can_be_reused_at_once(steps, ended_by):
    engine = make_engine(**STEPS[steps])
    old, params = stopping_request()
    new, other = random_prompts(2, 4, 10)
    other_params = SamplingParams(temperature=0.9, seed=random.randrange(1000), max_tokens=20)
    engine.add_request("x", other, other_params)
    engine.add_request("a", old, params)
    finished = {}
    if ended_by == "stop":
        while "a" not in finished:
            finished.update((o.request_id, o) for o in engine.step() if o.finished)
    else:
        engine.step()
        engine.send_steps()
        assert engine.abort_request("a").finished
    assert "a" in engine.scheduler._in_flight   # a step in flight still holds the id
    engine.add_request("a", new, params)
    while engine.has_unfinished_requests():
        finished.update((o.request_id, o) for o in engine.step() if o.finished)
    assert finished["a"].prompt_token_ids == new
    assert finished["a"].outputs[0].token_ids == alone(new, params)
    assert finished["x"].outputs[0].token_ids == alone(other, other_params)
    assert_all_free(engine)


def test_an_id_still_running_is_refused():
    engine = make_engine(async_scheduling=True)
    engine.add_request("b", random_prompts(1, 4, 10)[0], SamplingParams(n=2, max_tokens=5))
    with pytest.raises(ValueError, match="clashes with the running sequence 'b#1'"):
        engine.add_request("b#1", [1, 2, 3])


def test_async_llm_reuses_an_id_right_after_its_final_output(monkeypatch):
    """The engine thread applies the second request before it collects the step that was
    sent ahead of the first one's stop token (it waits for the add after delivering)."""
    engine = make_engine(async_scheduling=True)
    llm = AsyncLLM.from_engine(engine)
    old, params = stopping_request()
    new = random_prompts(1, 4, 10)[0]
    held_when_added = []
    route = llm._route

    def route_then_wait_for_the_next_add(outputs):
        route(outputs)
        if any(o.request_id == "a" and o.finished for o in outputs) and not held_when_added:
            deadline = time.monotonic() + 10.0
            while not llm._commands and time.monotonic() < deadline:
                time.sleep(0.001)
            held_when_added.append("a" in engine.scheduler._in_flight)

    monkeypatch.setattr(llm, "_route", route_then_wait_for_the_next_add)

    async def run(prompt):
        return [o async for o in llm.generate(prompt, params, "a")][-1]

    async def main():
        return await run(old), await run(new)

    first, second = asyncio.run(main())
    assert held_when_added == [True]
    assert first.outputs[0].token_ids == alone(old, params)
    assert second.outputs[0].token_ids == alone(new, params)
    wait_idle(engine)  # the engine thread may still collect the step sent ahead
    assert_all_free(engine)

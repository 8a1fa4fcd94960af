"""AsyncLLM over the checking fake worker: cancels and aborts end exactly their request and
free its blocks, and a reused request id is not aborted by the stream it replaces, also
with many streams over a tight KV cache. Event loops are in test_async_llm_event_loops.py,
refused input in test_async_llm_refusals.py, engine failures in test_async_llm_failures.py.

Every wait is bounded (asyncio.wait_for, deadlines), so a regression fails instead of hanging.
"""

import asyncio
import collections.abc
import contextlib
import typing

import pytest

from async_llm_helpers import (TIMEOUT, StepGate, collect, greedy, random_prompt,
                               reference_tokens, until, wait_idle)
from fake_engine_checks import assert_all_free
from fake_model import make_engine
from shardline.engine.async_llm import AsyncLLM
from shardline.engine.llm import LLM
from shardline.engine.output_queue import MAX_UNREAD
from shardline.engine.outputs import RequestOutput


def test_reused_request_id_is_not_aborted_by_the_closing_stream(rng):
    engine = make_engine()
    llm = AsyncLLM.from_engine(engine)
    first_prompt, second_prompt = random_prompt(rng), random_prompt(rng)
    params = greedy(rng.randint(4, 12))

    async def main():
        first = llm.generate(first_prompt, params, "x")
        await asyncio.wait_for(first.__anext__(), TIMEOUT)
        await until(lambda: not engine.has_unfinished_requests(), "the engine to finish 'x'")
        second = llm.generate(second_prompt, params, "x")
        head = await asyncio.wait_for(second.__anext__(), TIMEOUT)
        await first.aclose()  # closed before reading its final output
        return [head] + await asyncio.wait_for(collect(second), TIMEOUT)

    outputs = asyncio.run(main())
    assert outputs[-1].finished and outputs[-1].outputs[0].finish_reason == "length"
    assert outputs[-1].outputs[0].token_ids == reference_tokens(second_prompt, params)
    wait_idle(engine)
    assert_all_free(engine)


def test_a_stalled_consumer_holds_a_bounded_number_of_outputs(rng):
    """A stream queued every step's output for a consumer that did not read, each with its
    text so far (memory that grew with the square of the length). Past MAX_UNREAD unread
    outputs, the newest replaces the last queued one: the consumer still gets every token
    and the finished output, in fewer outputs than tokens (at most MAX_UNREAD after the
    first); one that keeps up is shown elsewhere to get one per step."""
    engine = make_engine()
    llm = AsyncLLM.from_engine(engine)
    prompt = random_prompt(rng)
    params = greedy(MAX_UNREAD + rng.randint(2, 40))

    async def main():
        stream = llm.generate(prompt, params, "stalled")
        first = await asyncio.wait_for(stream.__anext__(), TIMEOUT)
        await until(lambda: not engine.has_unfinished_requests(), "the request to finish")
        return [first] + await asyncio.wait_for(collect(stream), TIMEOUT)

    outputs = asyncio.run(main())
    assert len(outputs) <= 1 + MAX_UNREAD < len(outputs[-1].outputs[0].token_ids)
    lengths = [len(output.outputs[0].token_ids) for output in outputs]
    assert lengths == sorted(set(lengths))
    assert outputs[-1].finished and not any(output.finished for output in outputs[:-1])
    assert outputs[-1].outputs[0].token_ids == reference_tokens(prompt, params)
    wait_idle(engine)
    assert_all_free(engine)


def test_second_cancel_during_cleanup_still_aborts(rng, monkeypatch):
    engine = make_engine()
    gate = StepGate(engine, monkeypatch)
    llm = AsyncLLM.from_engine(engine)
    gate.hold(at_step=2)

    async def consume():
        async for _ in llm.generate(random_prompt(rng), greedy(200), "c"):
            pass

    async def main():
        task = asyncio.create_task(consume())
        await gate.held()
        task.cancel()
        for _ in range(5):
            await asyncio.sleep(0)
        task.cancel()  # while the first cancel's cleanup waits on the running step
        for _ in range(5):
            await asyncio.sleep(0)
        gate.release.set()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, TIMEOUT)

    asyncio.run(main())
    wait_idle(engine)
    steps_with_c = [i for i, step in enumerate(engine.executor.steps)
                    if "c" in step.num_scheduled_tokens]
    assert steps_with_c == [0, 1, 2], "the cancelled request kept running"
    assert_all_free(engine)


def test_cancel_while_a_step_runs_drops_its_result_and_frees_its_blocks(rng, monkeypatch):
    engine = make_engine()
    gate = StepGate(engine, monkeypatch)
    llm = AsyncLLM.from_engine(engine)
    keep_prompt, drop_prompt = random_prompt(rng), random_prompt(rng)
    params = greedy(30)
    held = rng.randint(1, 10)
    gate.hold(at_step=held)
    dropped = []

    async def consume_drop():
        async for output in llm.generate(drop_prompt, params, "drop"):
            dropped.append(output)

    async def main():
        # "drop" first: its add starts the engine thread, so it is in every step from the
        # first. Added second, it could miss the held step: the new thread may run up to
        # it before this loop gets the GIL back (6 runs in 1000 did).
        drop = asyncio.create_task(consume_drop())
        keep = asyncio.create_task(collect(llm.generate(keep_prompt, params, "keep")))
        await gate.held()
        drop.cancel()
        await asyncio.sleep(0.01)
        seen_at_cancel = len(dropped)
        gate.release.set()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(drop, TIMEOUT)
        assert "drop" not in engine.scheduler.seqs
        outputs = await asyncio.wait_for(keep, TIMEOUT)
        assert len(dropped) == seen_at_cancel <= held
        return outputs

    outputs = asyncio.run(main())
    assert outputs[-1].outputs[0].token_ids == reference_tokens(keep_prompt, params)
    steps = engine.executor.steps
    assert "drop" in steps[held].num_scheduled_tokens
    assert "drop" in steps[held + 1].finished_req_ids
    assert all("drop" not in step.num_scheduled_tokens for step in steps[held + 1:])
    wait_idle(engine)
    assert_all_free(engine)


def test_public_abort_ends_the_stream_with_an_aborted_output(rng, monkeypatch):
    engine = make_engine()
    gate = StepGate(engine, monkeypatch)
    llm = AsyncLLM.from_engine(engine)
    gate.hold(at_step=3)

    async def main():
        stream = asyncio.create_task(collect(llm.generate(random_prompt(rng), greedy(200), "a")))
        await gate.held()
        abort = asyncio.create_task(llm.abort("a"))
        await asyncio.sleep(0.01)
        assert not abort.done()  # it returns once the engine has applied it
        gate.release.set()
        await asyncio.wait_for(abort, TIMEOUT)
        assert not engine.has_unfinished_requests()
        return await asyncio.wait_for(stream, TIMEOUT)

    outputs = asyncio.run(main())
    assert outputs[-1].finished and outputs[-1].outputs[0].finish_reason == "abort"
    assert len(outputs[-1].outputs[0].token_ids) == 4
    wait_idle(engine)
    assert_all_free(engine)


@pytest.mark.parametrize("engine_kind", ["roomy", "preempting_ahead", "preempting_pipelined"])
def test_many_streams_with_cancels_and_reused_ids(rng, engine_kind):
    """Streams draw ids from a small pool, so ids are reused (and sometimes still in use);
    some are cancelled, some read slowly or stop before their last output. Every stream
    that is neither cancelled nor refused gets exactly its prompt's tokens, also when the
    KV cache is tight (preemption), prompts go in 16-token chunks and steps are in flight
    (scheduled ahead, or two pipelined)."""
    limits = {"roomy": dict(num_blocks=256, max_num_seqs=16, max_num_batched_tokens=64),
              "preempting_ahead": dict(num_blocks=12, max_num_seqs=16,
                                       max_num_batched_tokens=16, async_scheduling=True),
              "preempting_pipelined": dict(num_blocks=12, max_num_seqs=16,
                                           max_num_batched_tokens=16, pipeline_depth=2)}
    engine = make_engine(**limits[engine_kind])
    llm = AsyncLLM.from_engine(engine)
    jobs = []
    for i in range(80):
        params = greedy(rng.randint(1, 20))
        jobs.append(dict(prompt=random_prompt(rng), params=params, id=f"id{rng.randrange(30)}",
                         start=rng.uniform(0, 0.1), stop_after=rng.choice(
                             [None, None, None, rng.randint(0, params.max_tokens - 1)]),
                         pause=rng.choice([0, 0, 0.002])))

    async def run(job):
        await asyncio.sleep(job["start"])
        outputs = []
        try:
            async for output in llm.generate(job["prompt"], job["params"], job["id"]):
                outputs.append(output)
                await asyncio.sleep(job["pause"])
                if len(outputs) == job["stop_after"]:
                    return "stopped", outputs
        except ValueError as exc:
            assert "already in use" in str(exc)
            return "refused", outputs
        return "done", outputs

    async def main():
        tasks = [asyncio.create_task(run(job)) for job in jobs]
        await asyncio.sleep(0.02)
        cancelled = set(rng.sample(range(len(jobs)), 10))
        for i in cancelled:
            tasks[i].cancel()
        results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 60)
        return cancelled, results

    cancelled, results = asyncio.run(main())
    outcomes = []
    for i, (job, result) in enumerate(zip(jobs, results)):
        if isinstance(result, asyncio.CancelledError):
            assert i in cancelled
            outcomes.append("cancelled")
            continue
        assert not isinstance(result, BaseException), result
        outcome, outputs = result
        outcomes.append(outcome)
        if outcome == "done":
            assert outputs[-1].finished
            assert outputs[-1].outputs[0].token_ids == reference_tokens(job["prompt"],
                                                                       job["params"])
    print({outcome: outcomes.count(outcome) for outcome in set(outcomes)}, engine.stats)
    assert outcomes.count("done") >= 10
    assert engine.stats.num_preemptions > 0 or engine_kind == "roomy"
    wait_idle(engine)
    assert_all_free(engine)


def test_generate_is_typed_as_the_async_generator_it_is(rng):
    """generate was annotated AsyncIterator, so a type checker refused the `aclose` its
    docstring offers (and contextlib.aclosing): "AsyncIterator[RequestOutput]" has no
    attribute "aclose". aclose aborts the request at once."""
    hints = typing.get_type_hints(AsyncLLM.generate)
    assert typing.get_origin(hints["return"]) is collections.abc.AsyncGenerator
    assert typing.get_args(hints["return"]) == (RequestOutput, type(None))
    for method in (AsyncLLM.metrics, LLM.metrics):
        assert typing.get_type_hints(method)["return"] == dict[str, typing.Any]
    engine = make_engine()
    llm = AsyncLLM.from_engine(engine)
    reads = rng.randint(1, 5)

    async def main():
        async with contextlib.aclosing(llm.generate(random_prompt(rng), greedy(200), "a")) \
                as stream:
            async for output in stream:
                if len(output.outputs[0].token_ids) == reads:
                    break
        assert "a" not in engine.outputs.requests

    asyncio.run(main())
    wait_idle(engine)
    assert_all_free(engine)

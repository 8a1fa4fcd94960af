"""The engine over the checking fake worker, request by request: aborts through the
incremental API, and AsyncLLM streams that are cancelled, fail alone, keep the event loop
free and end when a step fails."""

import asyncio
import contextlib
import threading
import time

import pytest

from fake_engine_checks import GREEDY, assert_all_free
from fake_model import make_engine, random_prompts
from shardline.engine.async_llm import AsyncLLM
from shardline.engine.llm import LLM
from shardline.sampling_params import SamplingParams

pytestmark = pytest.mark.usefixtures("seeded_random")


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

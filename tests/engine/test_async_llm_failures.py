"""AsyncLLM over the checking fake worker when the engine stops: shutdown, an unexpected
error while adding a request, a dead worker. Open streams end with the error instead of
hanging, and later requests and check_health raise it (EngineDeadError where a supervisor
that restarts the engine must catch it). Every wait is bounded."""

import asyncio
import gc
import threading
import weakref

import pytest

from async_llm_helpers import TIMEOUT, StepGate, collect, greedy, random_prompt
from fake_model import make_engine
from shardline.engine.async_llm import AsyncLLM
from shardline.executor.base import EngineDeadError


def raise_at_step(engine, monkeypatch, step: int, error: Exception) -> None:
    """Make the engine raise `error` in its step number `step` (counted from 0)."""
    real_step = engine.step

    def failing_step():
        if len(engine.executor.steps) == step:
            raise error
        return real_step()
    monkeypatch.setattr(engine, "step", failing_step)


def test_shutdown_ends_open_streams_and_refuses_new_ones(rng, monkeypatch):
    """With EngineDeadError, which a stack that restarts a stopped engine catches (it was a
    plain RuntimeError)."""
    engine = make_engine()
    gate = StepGate(engine, monkeypatch)
    llm = AsyncLLM.from_engine(engine)
    gate.hold(at_step=1)

    async def main():
        stream = llm.generate(random_prompt(rng), greedy(200), "s")
        await asyncio.wait_for(stream.__anext__(), TIMEOUT)
        await gate.held()
        threading.Timer(0.05, gate.release.set).start()
        llm.shutdown()  # waits for the held step to end
        with pytest.raises(EngineDeadError, match="shut down"):
            await asyncio.wait_for(collect(stream), TIMEOUT)
        with pytest.raises(EngineDeadError, match="shut down"):
            await asyncio.wait_for(collect(llm.generate([1, 2], None, "t")), TIMEOUT)

    asyncio.run(main())
    with pytest.raises(EngineDeadError, match="shut down"):
        llm.check_health()
    assert len(engine.executor.steps) == 2


def test_unexpected_error_while_adding_fails_every_stream_instead_of_hanging(rng, monkeypatch):
    engine = make_engine()
    llm = AsyncLLM.from_engine(engine)
    real_add = engine.add_request

    def add_request(request_id, *args, **kwargs):
        if request_id == "breaks":
            raise RuntimeError("scheduler bug")
        return real_add(request_id, *args, **kwargs)
    monkeypatch.setattr(engine, "add_request", add_request)
    # After its first step the engine waits until "breaks" is queued, so "running" cannot
    # finish first, however the threads are scheduled.
    breaks_queued = threading.Event()
    real_step = engine.step
    steps = 0

    def step():
        nonlocal steps
        steps += 1
        if steps > 1:
            assert breaks_queued.wait(TIMEOUT)
        return real_step()
    monkeypatch.setattr(engine, "step", step)

    async def main():
        running = llm.generate(random_prompt(rng), greedy(200), "running")
        await asyncio.wait_for(running.__anext__(), TIMEOUT)
        breaking = asyncio.ensure_future(collect(llm.generate(random_prompt(rng), None,
                                                              "breaks")))
        await asyncio.sleep(0)  # the task runs up to its first wait, after queueing its add
        breaks_queued.set()
        with pytest.raises(RuntimeError, match="scheduler bug"):
            await asyncio.wait_for(breaking, TIMEOUT)
        with pytest.raises(RuntimeError, match="scheduler bug"):
            await asyncio.wait_for(collect(running), TIMEOUT)
        with pytest.raises(RuntimeError, match="accepts no more requests"):
            await asyncio.wait_for(collect(llm.generate([1, 2], None, "later")), TIMEOUT)

    asyncio.run(main())


def test_a_stopped_engine_raises_engine_dead_error_for_a_supervisor_to_catch(rng, monkeypatch):
    """A dead worker's EngineDeadError reached open streams, but new requests and
    check_health raised a plain RuntimeError, as did everything after shutdown: a stack
    that restarts on EngineDeadError missed them."""
    engine = make_engine()
    llm = AsyncLLM.from_engine(engine)
    death = EngineDeadError(f"worker rank {rng.randint(1, 7)} died with exit code -9")
    raise_at_step(engine, monkeypatch, rng.randint(1, 4), death)

    async def main():
        with pytest.raises(EngineDeadError) as raised:
            await asyncio.wait_for(collect(llm.generate(random_prompt(rng), greedy(50), "a")),
                                   TIMEOUT)
        assert raised.value is death
        for call in (lambda: collect(llm.generate(random_prompt(rng), None, "b")),
                     llm.check_health):
            with pytest.raises(EngineDeadError, match="failed in an earlier step") as raised:
                result = call()
                if asyncio.iscoroutine(result):
                    await asyncio.wait_for(result, TIMEOUT)
            assert raised.value.__cause__ is death

    asyncio.run(main())


@pytest.mark.parametrize("error_type", [ValueError, IndexError, RuntimeError])
def test_a_failed_step_ends_every_stream_with_engine_dead_error(error_type, rng, monkeypatch):
    """Open streams raised a failed step's bare error: a ValueError read as a bad request
    of the stream's own (a 400, the engine kept), while later requests got EngineDeadError."""
    engine = make_engine()
    llm = AsyncLLM.from_engine(engine)
    fail_at = rng.randint(1, 6)
    error = error_type(f"step {fail_at} failed")
    raise_at_step(engine, monkeypatch, fail_at, error)

    async def main():
        streams = [collect(llm.generate(random_prompt(rng), greedy(50), f"s{i}"))
                   for i in range(rng.randint(1, 4))]
        results = await asyncio.wait_for(asyncio.gather(*streams, return_exceptions=True),
                                         TIMEOUT)
        # The first stream is open when the step fails; a later one may start after it.
        for result in results:
            assert isinstance(result, EngineDeadError), repr(result)
            assert error_type.__name__ in str(result) and str(error) in str(result)
            assert result.__cause__ is error
        with pytest.raises(EngineDeadError, match="failed in an earlier step") as raised:
            await asyncio.wait_for(collect(llm.generate(random_prompt(rng), None, "later")),
                                   TIMEOUT)
        assert raised.value.__cause__ is error

    asyncio.run(main())


def test_a_worker_death_while_idle_is_seen_by_check_health(rng):
    """A worker that died while the engine was idle went unnoticed until a request failed
    on it: check_health (the server's /health, a load balancer's probe) said healthy. The
    executor's watcher reports the death, as a multi-process executor's does, from its own
    thread; the AsyncLLM it reports to stays collectable."""
    engine = make_engine()
    callbacks = []
    engine.executor.add_death_callback = callbacks.append
    llm = AsyncLLM.from_engine(engine)
    prompt = random_prompt(rng)
    asyncio.run(asyncio.wait_for(collect(llm.generate(prompt, greedy(4), "a")), TIMEOUT))
    llm.check_health()
    death = EngineDeadError(f"worker rank {rng.randint(1, 7)} died with exit code -9")
    watcher = threading.Thread(target=callbacks[0], args=(death,))
    watcher.start()
    watcher.join(TIMEOUT)
    with pytest.raises(EngineDeadError, match="when a worker died") as raised:
        llm.check_health()
    assert raised.value.__cause__ is death
    with pytest.raises(EngineDeadError, match=str(death)):
        asyncio.run(asyncio.wait_for(collect(llm.generate(prompt, None, "b")), TIMEOUT))
    llm.shutdown()
    collected = weakref.ref(llm)
    del llm, raised  # the traceback holds the AsyncLLM's frames
    gc.collect()
    assert collected() is None, "the watcher's callback kept the AsyncLLM alive"

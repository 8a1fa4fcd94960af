"""AsyncLLM over the checking fake worker: request ids, cancels, event loops, bad input.

Every wait is bounded (asyncio.wait_for, deadlines), so a regression fails instead of hanging.
"""

import asyncio
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from fake_model import VOCAB, make_engine
from shardline.engine.async_llm import AsyncLLM
from shardline.engine.llm import LLM
from shardline.executor.base import EngineDeadError
from shardline.sampling_params import SamplingParams

TIMEOUT = 10.0


def random_prompt(rng: random.Random, low: int = 3, high: int = 20) -> list[int]:
    return [rng.randrange(VOCAB) for _ in range(rng.randint(low, high))]


def reference_tokens(prompt: list[int], params: SamplingParams) -> list[int]:
    return LLM.from_engine(make_engine()).generate([prompt], params)[0].outputs[0].token_ids


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens)


def assert_all_free(engine) -> None:
    engine.kv.check_invariants()
    assert engine.kv.num_free_blocks == engine.kv.num_blocks
    assert not engine.has_unfinished_requests()
    assert not engine.scheduler.seqs


async def collect(stream) -> list:
    return [output async for output in stream]


async def until(condition, what: str) -> None:
    """Yield to the event loop until `condition()` holds; fail after TIMEOUT seconds."""
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.001)


def wait_idle(engine) -> None:
    deadline = time.monotonic() + TIMEOUT
    while engine.has_unfinished_requests():
        assert time.monotonic() < deadline, "the engine never became idle"
        time.sleep(0.001)


class StepGate:
    """Holds the engine inside one chosen step (numbered from 0 over the engine's life), so a
    test can act while that step runs, whatever the machine's speed."""

    def __init__(self, engine, monkeypatch) -> None:
        self.engine = engine
        self.entered = threading.Event()
        self.release = threading.Event()
        self.at_step: int | None = None
        real_step = engine.step

        def step():
            if len(engine.executor.steps) == self.at_step:
                self.entered.set()
                assert self.release.wait(TIMEOUT), "the test never released the held step"
            return real_step()
        monkeypatch.setattr(engine, "step", step)

    def hold(self, at_step: int | None = None) -> None:
        """Hold step `at_step`, by default the next one to run."""
        self.entered.clear()
        self.release.clear()
        self.at_step = len(self.engine.executor.steps) if at_step is None else at_step

    async def held(self) -> None:
        await until(self.entered.is_set, f"the engine to enter step {self.at_step}")


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


@pytest.mark.parametrize("prompt, params, message", [
    (None, None, r"prompt=None"),
    (7, None, r"prompt=7"),
    ({1: 2}, None, r"prompt=\{1: 2\}"),
    (b"\x01\x02", None, r"prompt=b'\\x01\\x02'"),
    ([True, False], None, r"prompt\[0\]=True is not a token id"),
    ([1, 2], 7, r"sampling_params=7"),
    ([1, 2], {"max_tokens": 3}, r"sampling_params=\{'max_tokens': 3\}"),
])
def test_bad_prompt_or_params_type_raises_value_error(rng, prompt, params, message):
    engine = make_engine()
    llm = AsyncLLM.from_engine(engine)
    good_prompt = random_prompt(rng)

    async def main():
        good = asyncio.create_task(collect(llm.generate(good_prompt, greedy(6), "good")))
        with pytest.raises(ValueError, match=message):
            await asyncio.wait_for(collect(llm.generate(prompt, params, "bad")), TIMEOUT)
        return await asyncio.wait_for(good, TIMEOUT)

    outputs = asyncio.run(main())
    assert outputs[-1].outputs[0].token_ids == reference_tokens(good_prompt, greedy(6))
    wait_idle(engine)
    assert_all_free(engine)


def test_duplicate_request_id_fails_the_newcomer_only(rng, monkeypatch):
    engine = make_engine()
    gate = StepGate(engine, monkeypatch)
    llm = AsyncLLM.from_engine(engine)
    prompt = random_prompt(rng)
    gate.hold(at_step=1)

    async def main():
        first = llm.generate(prompt, greedy(20), "dup")
        head = await asyncio.wait_for(first.__anext__(), TIMEOUT)
        await gate.held()
        duplicate = asyncio.create_task(collect(llm.generate(prompt, greedy(5), "dup")))
        await asyncio.sleep(0.01)
        gate.release.set()
        with pytest.raises(ValueError, match="already in use"):
            await asyncio.wait_for(duplicate, TIMEOUT)
        return [head] + await asyncio.wait_for(collect(first), TIMEOUT)

    outputs = asyncio.run(main())
    assert outputs[-1].outputs[0].token_ids == reference_tokens(prompt, greedy(20))
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


def test_request_id_must_be_a_string(rng):
    llm = AsyncLLM.from_engine(make_engine())

    async def main():
        with pytest.raises(ValueError, match=r"request_id=\['x'\] \(list\) is not a string"):
            await asyncio.wait_for(collect(llm.generate(random_prompt(rng), None, ["x"])), TIMEOUT)

    asyncio.run(main())


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
    real_step = engine.step
    steps = rng.randint(1, 4)

    def step():
        if len(engine.executor.steps) == steps:
            raise death
        return real_step()
    monkeypatch.setattr(engine, "step", step)

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


def test_bad_prompt_token_ids_fail_their_stream_alone(rng):
    """The ids a caller passes with its prompt went to the workers unchecked: one out of
    the vocabulary failed the step (IndexError in the embedding) and stopped the engine
    for every stream; so did a prompt longer than max_model_len, or params of the wrong
    type."""
    engine = make_engine(max_model_len=64)
    llm = AsyncLLM.from_engine(engine)
    good = random_prompt(rng)
    spot = rng.randrange(len(good))
    bad_cases = [
        (good[:spot] + [VOCAB + rng.randint(0, 10**9)] + good[spot:], None,
         rf"prompt_token_ids\[{spot}\]=\d+ is outside the vocabulary"),
        (good[:spot] + [-rng.randint(1, 10**9)] + good[spot:], None, "outside the vocabulary"),
        (good[:spot] + [True] + good[spot:], None, rf"prompt_token_ids\[{spot}\]=True is not"),
        (good[:spot] + [1.0] + good[spot:], None, rf"prompt_token_ids\[{spot}\]=1.0 is not"),
        ([], None, "prompt is empty"),
        ("abc", None, "not a list of token ids"),
        ([rng.randrange(VOCAB) for _ in range(rng.randint(65, 200))], None,
         "longer than max_model_len=64"),
        (good, {"temperature": 0}, r"sampling_params=\{'temperature': 0\} \(dict\) is not a "
                                   "SamplingParams"),
    ]

    async def main():
        for ids, params, message in rng.sample(bad_cases, len(bad_cases)):
            with pytest.raises(ValueError, match=message):
                await asyncio.wait_for(collect(llm.generate("", params, "bad",
                                                            prompt_token_ids=ids)), TIMEOUT)
        outputs = await asyncio.wait_for(collect(llm.generate(
            "", greedy(8), "good", prompt_token_ids=tuple(good))), TIMEOUT)
        assert outputs[-1].outputs[0].token_ids == reference_tokens(good, greedy(8))

    asyncio.run(main())
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

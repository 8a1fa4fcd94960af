"""LLM as a library uses it: shared by threads, interrupted, shut down while in use.

Most tests run over the checking fake worker (fake_model.py); every wait is bounded.
"""

import io
import random
import threading
import time

import pytest

from fake_engine_checks import assert_all_free
from fake_model import VOCAB, make_engine
from shardline import LLM, EngineDeadError, SamplingParams

TIMEOUT = 10.0


def random_prompts(rng: random.Random, count: int) -> list[list[int]]:
    return [[rng.randrange(VOCAB) for _ in range(rng.randint(3, 20))] for _ in range(count)]


def token_ids(outputs) -> list[list[int]]:
    return [list(output.outputs[0].token_ids) for output in outputs]


def slow_steps(llm: LLM, monkeypatch, seconds: float = 0.002) -> None:
    """Let each step release the GIL for a moment after it runs, as a step waiting for a
    GPU or for worker processes does, so that threads interleave between steps."""
    real_step = llm.engine.step

    def step():
        outputs = real_step()
        time.sleep(seconds)
        return outputs
    monkeypatch.setattr(llm.engine, "step", step)


def raise_at_step(llm: LLM, monkeypatch, step: int, error: BaseException) -> None:
    """Make the executor raise `error` when sent step number `step` (counted from 0)."""
    executor = llm.engine.executor
    real_execute = executor.execute_model

    def execute_model(*args, **kwargs):
        if len(executor.steps) == step:
            raise error
        return real_execute(*args, **kwargs)
    monkeypatch.setattr(executor, "execute_model", execute_model)


def test_generate_from_several_threads_gives_each_its_own_outputs(rng, monkeypatch):
    """Threads sharing one LLM stepped its engine at once: a thread took another's finished
    outputs, and the engine's state broke ('could not make progress')."""
    llm = LLM.from_engine(make_engine(num_blocks=256, max_num_seqs=32))
    slow_steps(llm, monkeypatch)
    jobs = [(random_prompts(rng, rng.randint(1, 4)),
             SamplingParams(temperature=0.0, max_tokens=rng.randint(1, 24), ignore_eos=True))
            for _ in range(4)]
    expected = [token_ids(LLM.from_engine(make_engine()).generate(prompts, params))
                for prompts, params in jobs]
    results: dict[int, object] = {}
    start = threading.Barrier(len(jobs))

    def run(i: int) -> None:
        start.wait(TIMEOUT)
        try:
            results[i] = token_ids(llm.generate(*jobs[i]))
        except Exception as exc:   # reported below, with the thread's index
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(len(jobs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT)
    assert not any(thread.is_alive() for thread in threads), "a generate never returned"
    assert [results[i] for i in range(len(jobs))] == expected
    assert_all_free(llm.engine)


def test_interrupt_between_steps_aborts_the_requests_and_the_llm_goes_on(rng, monkeypatch):
    """A Ctrl-C while generate handled a step's outputs left its requests running: they
    held KV blocks and took part in every later step."""
    llm = LLM.from_engine(make_engine())
    prompts = random_prompts(rng, rng.randint(2, 5))
    # Each finishes at its own step, so some are still running when the interrupt comes.
    params = [SamplingParams(temperature=0.0, max_tokens=4 * i + rng.randint(1, 4),
                             ignore_eos=True) for i in range(len(prompts))]
    expected = token_ids(LLM.from_engine(make_engine()).generate(prompts, params))
    writes = rng.randint(1, len(prompts) - 1)

    class InterruptedStderr(io.StringIO):
        def write(self, text: str) -> int:
            nonlocal writes
            writes -= 1
            if writes == -1:
                raise KeyboardInterrupt
            return super().write(text)

    monkeypatch.setattr("sys.stderr", InterruptedStderr())
    with pytest.raises(KeyboardInterrupt):
        llm.generate(prompts, params, use_tqdm=True)
    monkeypatch.undo()
    llm.engine.collect_idle_steps()
    assert_all_free(llm.engine)
    assert token_ids(llm.generate(prompts, params)) == expected


def test_interrupt_inside_a_step_stops_the_llm_with_engine_dead_error(rng, monkeypatch):
    """A step interrupted midway is lost, so the engine runs no more; every later call
    re-raised the bare KeyboardInterrupt, which reads as another Ctrl-C."""
    llm = LLM.from_engine(make_engine())
    raise_at_step(llm, monkeypatch, rng.randint(1, 8), KeyboardInterrupt())
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    with pytest.raises(KeyboardInterrupt):
        llm.generate(random_prompts(rng, 3), params)
    for call in (lambda: llm.generate(random_prompts(rng, 1), params), llm.step,
                 lambda: llm.add_request("r", random_prompts(rng, 1)[0])):
        try:   # a KeyboardInterrupt escaping pytest.raises would end the whole session
            call()
        except BaseException as exc:
            raised = exc
        assert isinstance(raised, EngineDeadError), repr(raised)
        assert "interrupted (KeyboardInterrupt)" in str(raised)
        assert isinstance(raised.__cause__, KeyboardInterrupt)


@pytest.mark.parametrize("error_type", [ValueError, IndexError, RuntimeError])
def test_a_failed_step_stops_the_llm_with_engine_dead_error(error_type, rng, monkeypatch):
    """A step that failed (a kernel's IndexError, a worker's ValueError) raised that bare
    error, which a caller takes for a bad input of its own, and so did every later
    generate, after add_request had taken a request that would never run."""
    llm = LLM.from_engine(make_engine())
    fail_at = rng.randint(1, 8)
    error = error_type(f"step {fail_at} failed")
    raise_at_step(llm, monkeypatch, fail_at, error)
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    with pytest.raises(EngineDeadError, match=f"{error_type.__name__}: step {fail_at}") as raised:
        llm.generate(random_prompts(rng, rng.randint(1, 4)), params)
    assert raised.value.__cause__ is error
    for call in (lambda: llm.generate(random_prompts(rng, 1), params), llm.step,
                 lambda: llm.add_request("r", random_prompts(rng, 1)[0])):
        with pytest.raises(EngineDeadError, match="a step of this LLM failed") as raised:
            call()
        assert raised.value.__cause__ is error
    assert not llm.has_unfinished_requests()


def test_shutdown_from_another_thread_ends_a_running_generate(rng, monkeypatch):
    llm = LLM.from_engine(make_engine())
    slow_steps(llm, monkeypatch, seconds=0.01)
    params = SamplingParams(temperature=0.0, max_tokens=None, ignore_eos=True)
    raised: list[BaseException] = []

    def run() -> None:
        try:
            llm.generate(random_prompts(rng, 2), params)
        except BaseException as exc:
            raised.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    deadline, steps = time.monotonic() + TIMEOUT, rng.randint(1, 5)
    while llm.engine.stats.num_steps < steps:
        assert time.monotonic() < deadline, "generate never stepped"
        time.sleep(0.001)
    llm.shutdown()
    thread.join(TIMEOUT)
    assert not thread.is_alive(), "generate kept running after shutdown"
    assert len(raised) == 1 and isinstance(raised[0], EngineDeadError), raised
    assert "shut down" in str(raised[0])
    assert not llm.has_unfinished_requests()


def test_calls_after_shutdown_raise_engine_dead_error(rng):
    """With the in-process worker, generate after shutdown raised AttributeError ('NoneType'
    object has no attribute 'queue_step')."""
    prompt = [rng.randrange(3, 259) for _ in range(rng.randint(1, 8))]
    params = SamplingParams(temperature=0.0, max_tokens=rng.randint(1, 4), ignore_eos=True)
    with LLM("tiny-llama", device="cpu", num_kv_blocks=32) as llm:
        assert len(llm.generate(prompt, params)[0].outputs[0].token_ids) == params.max_tokens
    llm.shutdown()   # again: idempotent
    for call in (lambda: llm.generate(prompt, params), llm.step,
                 lambda: llm.add_request("r", prompt), lambda: llm.abort_request("r")):
        with pytest.raises(EngineDeadError, match="the LLM was shut down"):
            call()
    assert llm.metrics()["num_requests_running"] == 0


def test_generate_beside_added_requests_returns_its_own_outputs(rng):
    """generate counted every finished output: a request queued with add_request that
    finished first ended the loop early, and generate raised KeyError('gen-0')."""
    llm = LLM.from_engine(make_engine())
    prompts = random_prompts(rng, rng.randint(1, 4))
    params = SamplingParams(temperature=0.0, max_tokens=rng.randint(8, 20), ignore_eos=True)
    expected = token_ids(LLM.from_engine(make_engine()).generate(prompts, params))
    added = {f"mine-{i}": rng.randint(1, 4) for i in range(rng.randint(1, 4))}
    for request_id, max_tokens in added.items():
        llm.add_request(request_id, random_prompts(rng, 1)[0],
                        SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True))
    assert token_ids(llm.generate(prompts, params)) == expected
    assert_all_free(llm.engine)


def test_a_thousand_tiny_requests_leave_nothing_behind(rng):
    """1000 one-token-prompt requests with random n, lengths, seeds and stop conditions, a
    tenth of them aborted midway: afterwards no request, sequence or KV block is held, and
    the worker keeps only the sequences whose drop the engine has yet to send it."""
    llm = LLM.from_engine(make_engine(num_blocks=48, max_num_seqs=16))
    engine = llm.engine
    for batch in range(10):
        ids = [f"b{batch}-{i}" for i in range(100)]
        for request_id in ids:
            llm.add_request(request_id, [rng.randrange(VOCAB)], SamplingParams(
                n=rng.choice([1, 1, 2]), temperature=rng.choice([0.0, 1.0]),
                seed=rng.choice([None, rng.randrange(2**31)]), max_tokens=rng.randint(1, 6),
                stop_token_ids=[rng.randrange(VOCAB)], stop=rng.choice([[], ["ab"]])))
        doomed = set(rng.sample(ids, 10))
        while llm.has_unfinished_requests():
            llm.step()
            for request_id in list(doomed):
                if rng.random() < 0.3:
                    llm.abort_request(request_id)
                    doomed.discard(request_id)
    engine.collect_idle_steps()
    assert_all_free(engine)
    assert not engine.outputs.requests and not engine.scheduler._retired
    assert set(engine.executor.states) == set(engine.scheduler._finished_ids)
    assert len(engine.kv.tables) == 0

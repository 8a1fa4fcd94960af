"""The multi-process engine (tiny-llama, TP2 on the CPU) when its workers go or fail: a
worker killed during generation stops the engine with EngineDeadError (an idle AsyncLLM's
check_health says so without a request), a dropped LLM is
collected and its workers exit, and a worker's input error is the ValueError of the
in-process engine; nothing is left behind, no process and no shared-memory segment."""

from __future__ import annotations

import asyncio
import gc
import os
import random
import re
import signal
import threading
import time
import weakref

import pytest

from shardline import LLM, AsyncLLM, SamplingParams
from shardline.executor import EngineDeadError

from engine_prompts import random_prompt
from process_hygiene import (assert_gone, kill_while_stepping, leaked_segments, shm_segments,
                             wait_gone)

MODEL = "tiny-llama"
TIMEOUT_S = 60.0
pytestmark = pytest.mark.usefixtures("no_process_left_behind")


def test_a_dropped_llm_is_collected_and_its_workers_exit(rng):
    """An LLM nobody shuts down: once the last reference goes, the garbage collector
    reaches its executor (nothing the engine registered with it keeps it alive), whose
    workers exit and leave no segment behind."""
    segments_before = shm_segments()
    llm = LLM(MODEL, tensor_parallel_size=2, device="cpu", block_size=4, num_kv_blocks=64)
    pids = llm.engine.executor.worker_pids
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    assert len(llm.generate([random_prompt(rng, 3, 8)], params)[0].outputs[0].token_ids) == 4
    executor = weakref.ref(llm.engine.executor)
    del llm
    gc.collect()
    assert executor() is None, "the dropped LLM's executor is still referenced"
    wait_gone(pids, 10.0)
    assert_gone(pids)
    assert not leaked_segments(segments_before)


@pytest.mark.parametrize("when", ["mid-step", "between-steps"])
def test_a_killed_worker_raises_engine_dead_and_leaves_nothing(when, rng):
    """SIGKILL of TP rank 1 while a step runs, or while the engine waits between steps:
    that step (within 5 s of the kill) and every later one raise EngineDeadError naming the
    rank and its exit code, the metrics still read (they raised that error), and shutdown
    leaves no process and no segment behind."""
    segments_before = shm_segments()
    llm = LLM(MODEL, tensor_parallel_size=2, device="cpu", block_size=4, num_kv_blocks=256)
    pids = llm.engine.executor.worker_pids
    dead = rf"worker rank 1 \(pid {pids[1]}\) died with exit code -9"
    try:
        params = SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True)
        for i in range(2):
            llm.add_request(f"r{i}", random_prompt(rng, 4, 8), params)
        for _ in range(3):
            assert llm.step()  # generation is under way
        if when == "mid-step":
            elapsed = kill_while_stepping(llm, pids[1], dead, TIMEOUT_S)
            print(f"EngineDeadError {elapsed:.3f} s after SIGKILL of worker rank 1 mid-step")
            assert elapsed < 5.0
        else:
            seen = threading.Event()
            llm.engine.executor.add_death_callback(lambda error: seen.set())
            os.kill(pids[1], signal.SIGKILL)
            assert seen.wait(TIMEOUT_S), "the executor never saw the death"
            with pytest.raises(EngineDeadError, match=dead):
                llm.step()
        with pytest.raises(EngineDeadError, match=dead):
            llm.step()
        # Read without asking the dead workers for their step times.
        metrics = llm.metrics()
        assert metrics["kv_blocks_used"] == 0 and "step_time_per_rank_s" not in metrics
    finally:
        llm.shutdown()
    assert_gone(pids)
    assert not leaked_segments(segments_before)


def test_an_idle_async_llm_reports_a_dead_worker_without_a_request(rng):
    """AsyncLLM.check_health (the server's /health) said healthy for as long as no request
    came after a worker died while the engine was idle."""
    segments_before = shm_segments()
    llm = AsyncLLM("tiny-llama", tensor_parallel_size=2, device="cpu", block_size=4,
                   num_kv_blocks=64)
    pids = llm.engine.executor.worker_pids
    rank = rng.randrange(2)
    dead = rf"worker rank {rank} \(pid {pids[rank]}\) died with exit code -9"
    try:
        params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)

        async def generate(request_id: str) -> None:
            async for _ in llm.generate(random_prompt(rng, 3, 8), params, request_id):
                pass

        asyncio.run(asyncio.wait_for(generate("before"), TIMEOUT_S))
        llm.check_health()
        os.kill(pids[rank], signal.SIGKILL)
        deadline = time.monotonic() + TIMEOUT_S
        while True:
            try:
                llm.check_health()
            except EngineDeadError as exc:
                assert re.search(dead, str(exc)), exc
                break
            assert time.monotonic() < deadline, "check_health never saw the dead worker"
            time.sleep(0.05)
        with pytest.raises(EngineDeadError, match=dead):
            asyncio.run(asyncio.wait_for(generate("after"), TIMEOUT_S))
    finally:
        llm.shutdown()
    assert_gone(pids)
    assert not leaked_segments(segments_before)


def test_a_workers_input_error_is_the_same_error_as_in_process():
    """A budget too small for one KV block is a ValueError naming it with one rank in
    process; under TP2 it was a RuntimeError holding the worker's traceback."""
    budget = random.randint(1, 4000)
    with pytest.raises(ValueError) as in_process:
        LLM("tiny-llama", kv_cache_memory_bytes=budget, device="cpu")
    with pytest.raises(ValueError) as in_workers:
        LLM("tiny-llama", tensor_parallel_size=2, kv_cache_memory_bytes=budget, device="cpu")
    message = str(in_workers.value)
    assert message.startswith("determine_num_kv_blocks failed on worker rank ")
    assert "\n" not in message and f"kv_cache_memory_bytes={budget} is too small" in message
    assert str(in_process.value).split(":")[0] in message

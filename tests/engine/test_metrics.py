"""LLM.metrics() / AsyncLLM.metrics(): the counts match what the engine did, step times and
token rates follow a controlled clock, and the multi-process executor adds per-rank step
times."""

import asyncio
import threading
import time

import pytest

from fake_model import VOCAB, make_engine
from shardline.engine.async_llm import AsyncLLM
from shardline.engine.data_parallel import DataParallelEngine
from shardline.engine.llm import LLM
from shardline.engine.metrics import RATE_WINDOW_S, EngineMetrics
from shardline.executor.base import EngineDeadError
from shardline.engine.outputs import CompletionOutput, RequestOutput
from shardline.sampling_params import SamplingParams

TIMEOUT = 30.0


def prompts(rng, count, low=5, high=20):
    return [[rng.randrange(VOCAB) for _ in range(rng.randint(low, high))] for _ in range(count)]


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def finished(*reasons: str) -> RequestOutput:
    return RequestOutput("r", None, [1], [CompletionOutput(i, "", [2], finish_reason=r)
                                          for i, r in enumerate(reasons)], finished=True)


def test_step_times_count_from_send_or_the_previous_collect():
    clock = Clock()
    metrics = EngineMetrics(clock)
    metrics.step_sent()               # t=100
    clock.now = 101
    metrics.step_sent()               # t=101: a second step in flight
    clock.now = 103
    metrics.step_collected(10, [], 2)  # 3 s since its send
    clock.now = 104
    metrics.step_collected(4, [finished("stop", "length")], 2)  # 1 s since the last collect
    clock.now = 110
    metrics.step_sent()
    clock.now = 110.5
    metrics.step_collected(1, [], 1)  # idle gap not counted: 0.5 s since its send
    summary = metrics.step_times.summary()
    assert summary["count"] == 3 and summary["sum"] == pytest.approx(4.5)
    assert summary["p50"] == 1 and summary["max"] == 3
    assert metrics.generation_tokens == 5 and metrics.computed_tokens == 15
    assert dict(metrics.finished) == {"stop": 1, "length": 1}
    assert metrics.rates() == (pytest.approx(5 / RATE_WINDOW_S),
                               pytest.approx(15 / RATE_WINDOW_S))
    clock.now = 110.5 + RATE_WINDOW_S + 1
    assert metrics.rates() == (0.0, 0.0)


def test_counts_match_the_engine_and_everything_is_free_at_the_end(rng):
    engine = make_engine(num_blocks=14, block_size=4)
    llm = LLM.from_engine(engine)
    shared = prompts(rng, 1, 12, 12)[0]
    batch = [shared + p for p in prompts(rng, 6)]
    outputs = llm.generate(batch, SamplingParams(temperature=0.0, max_tokens=20, n=2))
    metrics = llm.metrics()
    stats = engine.stats
    assert stats.num_preemptions > 0  # 14 blocks cannot hold 12 sequences of 40 tokens
    assert metrics["num_preemptions"] == stats.num_preemptions
    assert metrics["num_steps"] == stats.num_steps == metrics["step_time_s"]["count"]
    assert metrics["generation_tokens_total"] == sum(len(c.token_ids) for o in outputs
                                                     for c in o.outputs)
    assert metrics["computed_tokens_total"] == stats.num_computed_tokens
    assert metrics["finished_completions"] == {"stop": 0, "length": 12, "abort": 0}
    assert 0 < metrics["prefix_cache_hit_rate"] == \
        stats.num_cached_tokens / stats.num_lookup_tokens < 1
    assert metrics["kv_blocks_used"] == 0 and metrics["kv_blocks_total"] == 14
    assert metrics["num_requests_running"] == metrics["num_requests_waiting"] == 0
    assert "step_time_per_rank_s" not in metrics  # one rank in process


def test_running_waiting_and_blocks_mid_flight_and_aborts(rng):
    engine = make_engine(num_blocks=64, block_size=4, max_num_seqs=2)
    llm = LLM.from_engine(engine)
    for i, prompt in enumerate(prompts(rng, 3)):
        llm.add_request(f"r{i}", prompt, SamplingParams(max_tokens=50))
    llm.step()
    metrics = llm.metrics()
    assert metrics["num_requests_running"] == 2 and metrics["num_requests_waiting"] == 1
    held = {b for table in engine.kv.tables.values() for b in table}
    assert metrics["kv_blocks_used"] == len(held) > 0
    assert metrics["kv_usage"] == len(held) / 64
    for i in range(3):
        llm.abort_request(f"r{i}")
    metrics = llm.metrics()
    assert metrics["finished_completions"]["abort"] == 3
    assert metrics["kv_blocks_used"] == 0
    assert metrics["num_requests_running"] == metrics["num_requests_waiting"] == 0


def test_async_llm_metrics_while_streaming_and_after_shutdown(rng):
    engine = make_engine()
    # Steps are slow until the metrics are read, so the request is still running then.
    read = threading.Event()
    step = engine.step

    def slow_step():
        if not read.is_set():
            time.sleep(0.02)
        return step()

    engine.step = slow_step
    llm = AsyncLLM.from_engine(engine)
    prompt = prompts(rng, 1)[0]

    async def run():
        seen = None
        async for output in llm.generate(prompt, SamplingParams(max_tokens=200), "a"):
            if seen is None:
                seen = await llm.metrics()
                read.set()
        return seen, await llm.metrics()

    during, after = asyncio.run(asyncio.wait_for(run(), TIMEOUT))
    assert during["num_requests_running"] == 1 and during["kv_blocks_used"] > 0
    assert after["generation_tokens_total"] == 200 and after["kv_blocks_used"] == 0
    llm.shutdown()
    assert asyncio.run(asyncio.wait_for(llm.metrics(), TIMEOUT))["num_steps"] == \
        after["num_steps"]


def test_a_failed_engine_counts_no_request_running_or_waiting(rng):
    """The engine fails mid-stream (a dead worker): its requests' streams end with the
    error, and the metrics no longer count them as running or waiting, nor their KV
    blocks as used (kv_usage kept its last value for as long as the server ran)."""
    engine = make_engine(max_num_seqs=2)
    step, steps_left = engine.step, rng.randint(1, 5)

    def failing_step():
        nonlocal steps_left
        steps_left -= 1
        if steps_left < 0:
            raise EngineDeadError("worker rank 1 died")
        return step()

    engine.step = failing_step
    llm = AsyncLLM.from_engine(engine)

    async def stream(prompt, request_id):
        with pytest.raises(EngineDeadError):
            async for _ in llm.generate(prompt, SamplingParams(max_tokens=200), request_id):
                pass

    async def run():
        await asyncio.gather(*(stream(p, f"r{i}") for i, p in enumerate(prompts(rng, 3))))
        return await llm.metrics()

    metrics = asyncio.run(asyncio.wait_for(run(), TIMEOUT))
    assert metrics["num_requests_running"] == metrics["num_requests_waiting"] == 0
    assert metrics["kv_blocks_used"] == metrics["kv_usage"] == 0
    assert metrics["kv_blocks_total"] == engine.kv.num_blocks
    assert metrics["num_steps"] > 0
    llm.shutdown()


@pytest.mark.parametrize("stop", ["failed step", "shutdown"])
def test_a_stopped_llm_counts_no_request_running_or_waiting(stop, rng):
    """LLM's metrics of an engine stopped under the incremental API still counted its
    requests as running or waiting and their KV blocks as used, as AsyncLLM's did before
    48855fb; after a failed step they also asked the dead workers for their step times."""
    engine = make_engine(max_num_seqs=2)
    llm = LLM.from_engine(engine)
    for i, prompt in enumerate(prompts(rng, rng.randint(1, 4))):
        llm.add_request(f"r{i}", prompt, SamplingParams(max_tokens=200))
    for _ in range(rng.randint(1, 5)):
        llm.step()
    if stop == "failed step":
        def execute_model(*args, **kwargs):
            raise EngineDeadError("worker rank 1 died")
        engine.executor.execute_model = execute_model
        with pytest.raises(EngineDeadError):
            llm.step()
    else:
        llm.shutdown()
    metrics = llm.metrics()
    assert metrics["num_requests_running"] == metrics["num_requests_waiting"] == 0
    assert metrics["kv_blocks_used"] == metrics["kv_usage"] == 0
    assert metrics["kv_blocks_total"] == engine.kv.num_blocks
    assert metrics["num_steps"] == engine.stats.num_steps > 0


def test_multiprocess_executor_reports_each_ranks_step_times(rng):
    llm = LLM("tiny-llama", block_size=4, num_kv_blocks=32, device="cpu",
              tensor_parallel_size=2)
    try:
        llm.generate(prompts(rng, 3, 3, 10), SamplingParams(temperature=0.0, max_tokens=4))
        metrics = llm.metrics()
    finally:
        llm.shutdown()
    ranks = metrics["step_time_per_rank_s"]
    assert [r["rank"] for r in ranks] == [0, 1]
    for rank in ranks:
        # Every rank runs every step (warm-up and profiling may add their own).
        assert rank["count"] >= metrics["num_steps"] > 0
        assert 0 < rank["p50"] <= rank["p99"] <= rank["max"]


def test_data_parallel_metrics_add_up_the_cores(rng):
    cores = [make_engine(num_blocks=32), make_engine(num_blocks=32)]
    llm = LLM.from_engine(DataParallelEngine(cores))
    for i, prompt in enumerate(prompts(rng, 4)):
        llm.add_request(f"r{i}", prompt, SamplingParams(max_tokens=30))
    llm.step()
    metrics = llm.metrics()
    assert all(core.scheduler.running for core in cores)  # both cores got work
    assert metrics["num_requests_running"] == 4
    assert metrics["kv_blocks_total"] == 64
    assert metrics["kv_blocks_used"] == sum(c.kv.num_blocks - c.kv.num_free_blocks
                                            for c in cores)
    assert metrics["num_steps"] == metrics["step_time_s"]["count"] == 2  # one per core
    assert metrics["generation_tokens_total"] == 4

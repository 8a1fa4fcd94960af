"""The helpers the executor tests share: an engine config over model-free stub workers,
the worlds of ranks they start (tensor- or data-parallel) and a decode step to send."""

from __future__ import annotations

import logging
import time

from shardline.config import CacheConfig, EngineConfig, ModelConfig, ParallelConfig, SchedulerConfig
from shardline.executor.data_parallel import create_data_parallel_executors
from shardline.executor.multiproc import MultiProcExecutor
from shardline.presets import resolve_model
from shardline.step import CachedRequestData, CachedRequests, SchedulerOutput
from stub_workers import SlowStepWorker

# A worker signalled this long before its step could have ended is surely inside the step,
# however slowly the signal travels (through a Ray node agent, on a loaded machine).
SIGNAL_MARGIN_S = 1.0


def make_config(worker: str = "StubWorker", **parallel) -> EngineConfig:
    return EngineConfig(ModelConfig(resolve_model("tiny-llama")), CacheConfig(),
                        SchedulerConfig(),
                        ParallelConfig(distributed_executor_backend="mp", device="cpu",
                                       worker_cls=worker if "." in worker
                                       else f"stub_workers.{worker}", **parallel))


WORLDS = {"tp2": dict(tensor_parallel_size=2), "dp2": dict(data_parallel_size=2)}


def start_world(config: EngineConfig) -> list[MultiProcExecutor]:
    """The started executors of `config`'s world of ranks: one per data-parallel core."""
    if config.parallel.data_parallel_size > 1:
        return create_data_parallel_executors(config)
    return [MultiProcExecutor(config)]


def step(*req_ids: str) -> SchedulerOutput:
    """A decode step of `req_ids`, one token each."""
    return SchedulerOutput(
        cached_requests=CachedRequests.of(CachedRequestData(r, [1], [], 0) for r in req_ids),
        num_scheduled_tokens={r: 1 for r in req_ids})


def slow_step_reports(caplog, sent: float) -> tuple[list[str], int]:
    """The slow-step reports in `caplog`, of a SlowStepWorker step sent at `sent`
    (time.time()), and how many of them came early enough that every worker was still
    inside the step when it wrote its stacks. A report near the step's end may find a
    worker past it: the test cannot ask that worker for a stack in `execute_model`."""
    records = [r for r in caplog.records if "a step has waited" in r.getMessage()]
    inside = sum(r.created < sent + SlowStepWorker.STEP_S - SIGNAL_MARGIN_S for r in records)
    return [r.getMessage() for r in records], inside


def slow_step_reports_of_core_0(cores: list, caplog) -> tuple[int, int]:
    """Send a step to every data-parallel core and read core 0's first, as the engine
    does, while the others' still run; the slow-step reports logged meanwhile, and how
    many came while every worker was inside its step (`slow_step_reports`). Every step
    answers."""
    sent = time.time()
    futures = [core.execute_model(step(f"r{i}"), non_block=True)
               for i, core in enumerate(cores)]
    with caplog.at_level(logging.WARNING, logger="shardline"):
        assert futures[0].result().req_ids == ["r0"]
    reports, inside = slow_step_reports(caplog, sent)
    assert [future.result().req_ids for future in futures] == [[f"r{i}"] for i in
                                                                range(len(cores))]
    return len(reports), inside

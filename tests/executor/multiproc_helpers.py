"""The helpers the executor tests share: an engine config over model-free stub workers,
the worlds of ranks they start (tensor- or data-parallel) and a decode step to send."""

from __future__ import annotations

import logging

from shardline.config import CacheConfig, EngineConfig, ModelConfig, ParallelConfig, SchedulerConfig
from shardline.executor.data_parallel import create_data_parallel_executors
from shardline.executor.multiproc import MultiProcExecutor
from shardline.presets import resolve_model
from shardline.step import CachedRequestData, CachedRequests, SchedulerOutput


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


def slow_step_reports_of_core_0(cores: list, caplog) -> int:
    """Send a step to every data-parallel core and read core 0's first, as the engine
    does, while the others' still run; the slow-step reports logged meanwhile. Every step
    answers."""
    futures = [core.execute_model(step(f"r{i}"), non_block=True)
               for i, core in enumerate(cores)]
    with caplog.at_level(logging.WARNING, logger="shardline"):
        assert futures[0].result().req_ids == ["r0"]
    reports = sum("a step has waited" in record.getMessage() for record in caplog.records)
    assert [future.result().req_ids for future in futures] == [[f"r{i}"] for i in
                                                                range(len(cores))]
    return reports

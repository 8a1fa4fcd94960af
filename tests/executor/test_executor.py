"""Executor factory and the in-process executor's worker lifecycle (with a stub Worker)."""

import gc
import random
import sys
import weakref

import pytest

from shardline.config import CacheConfig, EngineConfig, ModelConfig, ParallelConfig, SchedulerConfig
from shardline.step import ModelRunnerOutput, SchedulerOutput
from shardline.executor import create_executor, executor_class
from shardline.executor.uniproc import UniProcExecutor


class StubWorker:
    def __init__(self, config, rank=0):
        self.config, self.rank, self.calls = config, rank, []

    def init_device(self):
        self.calls.append("init_device")

    def load_model(self):
        self.calls.append("load_model")

    def determine_num_kv_blocks(self):
        self.calls.append("determine_num_kv_blocks")
        return 37

    def initialize_cache(self, num_blocks):
        self.calls.append(("initialize_cache", num_blocks))

    def warm_up(self):
        self.calls.append("warm_up")

    def queue_step(self, scheduler_output):
        return lambda: self.execute_model(scheduler_output)

    def execute_model(self, scheduler_output):
        return ModelRunnerOutput(req_ids=list(scheduler_output.num_scheduled_tokens),
                                 sampled_token_ids=[5] * len(scheduler_output.num_scheduled_tokens),
                                 logprobs=[None] * len(scheduler_output.num_scheduled_tokens))


def config(**parallel):
    return EngineConfig(ModelConfig("m"), CacheConfig(), SchedulerConfig(),
                        ParallelConfig(worker_cls="test_executor.StubWorker", **parallel))


def test_each_layout_gets_its_executor():
    from shardline.executor.multiproc import MultiProcExecutor

    assert executor_class(ParallelConfig()) is UniProcExecutor
    assert executor_class(ParallelConfig(distributed_executor_backend="uni")) is UniProcExecutor
    assert executor_class(ParallelConfig(tensor_parallel_size=2)) is MultiProcExecutor
    assert executor_class(ParallelConfig(distributed_executor_backend="mp")) is MultiProcExecutor


def test_the_ray_backend_without_ray_installed_says_how_to_get_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    monkeypatch.delitem(sys.modules, "shardline.executor.ray", raising=False)
    with pytest.raises(ImportError, match=r"'ray' needs Ray: .*pip install 'shardline\[ray\]'"):
        executor_class(ParallelConfig(distributed_executor_backend="ray"))


@pytest.mark.parametrize("layout, named", [
    (dict(pipeline_parallel_size=3, distributed_executor_backend="uni"),
     "'uni' runs one rank.*world_size=3.*use 'mp'"),
])
def test_layouts_an_executor_cannot_run_are_refused_clearly(layout, named):
    with pytest.raises(ValueError, match=named):
        executor_class(ParallelConfig(**layout))


def test_uniproc_brings_the_worker_up_and_relays_steps():
    executor = create_executor(config())
    assert executor.num_kv_blocks == 37
    assert executor.worker.calls == ["init_device", "load_model", "determine_num_kv_blocks",
                                     ("initialize_cache", 37), "warm_up"]
    assert executor.collective_rpc("determine_num_kv_blocks") == [37]
    out = executor.execute_model(SchedulerOutput(num_scheduled_tokens={"a": 3, "b": 1}))
    assert out.req_ids == ["a", "b"] and out.sampled_token_ids == [5, 5]
    executor.shutdown()
    executor.shutdown()


def test_a_dropped_executor_frees_its_worker_without_a_gc_pass():
    """A non-blocking step's future and its wait referred to each other, so the worker
    (and, in the engine, its model and KV cache) stayed until the next gc pass."""
    executor = create_executor(config())
    futures = [executor.execute_model(SchedulerOutput(num_scheduled_tokens={f"r{i}": 1}),
                                      non_block=True) for i in range(random.randint(1, 4))]
    assert [f.result().req_ids for f in futures] == [[f"r{i}"] for i in range(len(futures))]
    worker = weakref.ref(executor.worker)
    gc.disable()
    try:
        del executor, futures
        assert worker() is None
    finally:
        gc.enable()


@pytest.mark.parametrize("path, named", [
    ("no_such_module.Worker", "cannot import 'no_such_module'"),
    ("test_executor.NoSuchWorker", "has no 'NoSuchWorker'"),
])
def test_an_unknown_worker_class_is_named(path, named):
    cfg = EngineConfig(ModelConfig("m"), CacheConfig(), SchedulerConfig(),
                       ParallelConfig(worker_cls=path))
    with pytest.raises(ValueError, match=named):
        create_executor(cfg)

"""The executor boundary: the engine's only way to reach the workers.

The engine calls `execute_model` once per step and never sees ranks, devices or process
groups; everything about the parallel layout lives in an Executor subclass.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from typing import Any

from shardline.config import EngineConfig, ParallelConfig
from shardline.engine.batch import ModelRunnerOutput, SchedulerOutput

_BACKENDS = {
    "uni": "shardline.executor.uniproc:UniProcExecutor",
    "mp": "shardline.executor.multiproc:MultiProcExecutor",
    "ray": "shardline.executor.ray:RayExecutor",
}


class Executor(ABC):
    """Runs the workers of one model replica set and relays steps to them."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.num_kv_blocks = 0
        self._init_workers()

    @abstractmethod
    def _start_workers(self) -> None:
        """Create the workers (in process, in subprocesses, or on other nodes)."""

    @abstractmethod
    def collective_rpc(self, method: str, args: tuple = (), kwargs: dict | None = None
                       ) -> list[Any]:
        """Call `method` on every worker; return one reply per rank, in rank order."""

    @abstractmethod
    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        """Run one step on all workers; return the sampled tokens (from the output rank)."""

    @abstractmethod
    def shutdown(self) -> None:
        """Release the workers; safe to call more than once."""

    def _init_workers(self) -> None:
        """Bring every worker up and size the KV cache to what the tightest rank can hold."""
        self._start_workers()
        self.collective_rpc("init_device")
        self.collective_rpc("load_model")
        self.num_kv_blocks = min(self.collective_rpc("determine_num_kv_blocks"))
        self.collective_rpc("initialize_cache", args=(self.num_kv_blocks,))


def executor_class(parallel: ParallelConfig) -> type[Executor]:
    """The executor for a layout: in process for one rank, unless a backend is named."""
    backend = parallel.distributed_executor_backend
    if backend is None:
        backend = "uni" if parallel.world_size == 1 else "mp"
    if backend == "uni" and parallel.world_size != 1:
        raise ValueError(f"distributed_executor_backend='uni' runs one rank, but the layout "
                         f"has world_size={parallel.world_size}: use 'mp' or 'ray'")
    module_name, class_name = _BACKENDS[backend].split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name:
            raise
        raise ValueError(f"distributed_executor_backend={backend!r} is not available in this "
                         f"build ({module_name} is missing)") from exc
    return getattr(module, class_name)


def create_executor(config: EngineConfig) -> Executor:
    return executor_class(config.parallel)(config)

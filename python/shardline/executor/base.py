"""The executor boundary: the engine's only way to reach the workers.

The engine calls `execute_model` once per step and never sees ranks, devices or process
groups; everything about the parallel layout lives in an Executor subclass.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from shardline.config import EngineConfig, ParallelConfig
from shardline.step import ModelRunnerOutput, SchedulerOutput

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
        """Bring every worker up, size the KV cache to what the tightest rank can hold, and
        warm the workers up (kernel tuning and decode graphs, on GPUs) over that cache."""
        self._start_workers()
        self.collective_rpc("init_device")
        self.collective_rpc("load_model")
        self.num_kv_blocks = min(self.collective_rpc("determine_num_kv_blocks"))
        self.collective_rpc("initialize_cache", args=(self.num_kv_blocks,))
        self.collective_rpc("warm_up")


def executor_class(parallel: ParallelConfig) -> type[Executor]:
    """The executor for a layout. This version runs one rank, in the engine's process."""
    if parallel.world_size != 1 or parallel.distributed_executor_backend not in (None, "uni"):
        raise ValueError(
            f"tensor_parallel_size={parallel.tensor_parallel_size}, pipeline_parallel_size="
            f"{parallel.pipeline_parallel_size}, data_parallel_size="
            f"{parallel.data_parallel_size}, sequence_parallel_size="
            f"{parallel.sequence_parallel_size} (world_size={parallel.world_size}) with "
            f"distributed_executor_backend={parallel.distributed_executor_backend!r}: "
            "multi-rank executors are not implemented yet; use world_size 1 and backend "
            "None or 'uni'")
    from shardline.executor.uniproc import UniProcExecutor

    return UniProcExecutor


def create_executor(config: EngineConfig) -> Executor:
    """Build and start the executor (and so the workers) that `config` describes."""
    return executor_class(config.parallel)(config)

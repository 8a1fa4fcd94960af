"""The executor boundary: the engine's only way to reach the workers.

The engine calls `execute_model` once per step and never sees ranks, devices or process
groups; everything about the parallel layout lives in an Executor subclass.
"""

from __future__ import annotations

import os
import time
from abc import ABC, abstractmethod
from typing import Any, Callable

from shardline.config import EngineConfig, ParallelConfig
from shardline.step import ModelRunnerOutput, SchedulerOutput


class EngineDeadError(RuntimeError):
    """A worker died (killed, crashed, out of memory) or the executor was shut down: the
    engine cannot run any more steps. The message names the rank and its exit code."""


class StepFuture:
    """The sampled tokens of one step sent with `execute_model(..., non_block=True)`.

    `result()` waits for them; an executor resolves the steps it has in flight in the
    order they were sent.
    """

    def __init__(self, wait: Callable[[float | None], None] | None = None,
                 call_id: int = 0) -> None:
        self._wait = wait
        self.call_id = call_id
        self._value: ModelRunnerOutput | None = None
        self._error: BaseException | None = None
        self._done = False

    @classmethod
    def completed(cls, value: ModelRunnerOutput) -> "StepFuture":
        future = cls()
        future.set_result(value)
        return future

    def done(self) -> bool:
        return self._done

    def set_result(self, value: ModelRunnerOutput) -> None:
        self._value, self._done = value, True

    def set_exception(self, error: BaseException) -> None:
        self._error, self._done = error, True

    def result(self, timeout: float | None = None) -> ModelRunnerOutput:
        """The step's output; TimeoutError if it is not back within `timeout` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._done:
            self._wait(deadline)
        if self._error is not None:
            raise self._error
        return self._value


class Executor(ABC):
    """Runs the workers of one model replica set and relays steps to them."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.num_kv_blocks = 0
        check_layout(config)
        self._init_workers()

    @abstractmethod
    def _start_workers(self) -> None:
        """Create the workers (in process, in subprocesses, or on other nodes)."""

    @abstractmethod
    def collective_rpc(self, method: str, args: tuple = (), kwargs: dict | None = None,
                       timeout: float | None = None) -> list[Any]:
        """Call `method` on every worker; return one reply per rank, in rank order."""

    @abstractmethod
    def execute_model(self, scheduler_output: SchedulerOutput, non_block: bool = False
                      ) -> ModelRunnerOutput | StepFuture:
        """Run one step on all workers; return the sampled tokens (from the output rank),
        or with `non_block` a StepFuture of them, so that several steps can be in flight."""

    @property
    def max_concurrent_steps(self) -> int:
        """How many steps the engine should keep in flight: one per pipeline stage."""
        return self.config.parallel.pipeline_parallel_size

    @abstractmethod
    def shutdown(self) -> None:
        """Release the workers; safe to call more than once."""

    def _init_workers(self) -> None:
        """Bring every worker up, size the KV cache to what the tightest rank can hold, and
        warm the workers up (kernel tuning and decode graphs, on GPUs) over that cache."""
        try:
            self._start_workers()
            self.collective_rpc("init_device")
            self.collective_rpc("load_model")
            self.num_kv_blocks = min(self.collective_rpc("determine_num_kv_blocks"))
            self.collective_rpc("initialize_cache", args=(self.num_kv_blocks,))
            self.collective_rpc("warm_up")
        except BaseException:
            self.shutdown()
            raise

    def __enter__(self) -> "Executor":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()


def check_layout(config: EngineConfig) -> None:
    """Refuse, before any worker starts, a layout the model or the machine cannot take: a
    GPU device where torch sees none, or a split of the model (several ranks, or a list of
    layers per stage) that the model or the GPU count does not allow."""
    import torch

    from shardline.models.loader import read_model_info
    from shardline.models.partition import check_partition
    from shardline.worker.worker import pick_device

    parallel = config.parallel
    device = pick_device(0, parallel.device)
    gpus = torch.cuda.device_count() if device.type == "cuda" else None
    if gpus == 0:
        raise ValueError(f"device={parallel.device!r} (SHARDLINE_DEVICE="
                         f"{os.environ.get('SHARDLINE_DEVICE')!r}) asks for {device}, but torch "
                         "sees no GPU on this machine: use device='cpu'")
    if parallel.world_size > 1 or parallel.pipeline_stage_layers is not None:
        check_partition(parallel, read_model_info(config.model.model), gpus)


def executor_class(parallel: ParallelConfig) -> type[Executor]:
    """The executor for a layout: in process at world size 1 (unless "mp" is asked for),
    one process per rank on this machine otherwise."""
    backend = parallel.distributed_executor_backend
    if backend is None:
        backend = "uni" if parallel.world_size == 1 else "mp"
    if backend == "uni":
        if parallel.world_size != 1:
            raise ValueError(
                f"distributed_executor_backend='uni' runs one rank, but the layout has "
                f"world_size={parallel.world_size}: use 'mp' (or None) for several ranks")
        from shardline.executor.uniproc import UniProcExecutor

        return UniProcExecutor
    if backend == "mp":
        from shardline.executor.multiproc import MultiProcExecutor

        return MultiProcExecutor
    raise ValueError(f"distributed_executor_backend={backend!r} is not available in this "
                     "build: use None, 'uni' or 'mp'")


def create_executor(config: EngineConfig) -> Executor:
    """Build and start the executor (and so the workers) that `config` describes."""
    return executor_class(config.parallel)(config)

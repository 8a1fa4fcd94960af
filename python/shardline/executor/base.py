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
    """The engine cannot run any more steps: a worker died (killed, crashed, out of memory;
    the message names the rank and its exit code), the executor was shut down, or a step
    failed (LLM and AsyncLLM raise it then with the step's error as its cause). Exported
    as shardline.EngineDeadError; a serving stack catches it to build a new engine."""


class StepFuture:
    """The sampled tokens of one step sent with `execute_model(..., non_block=True)`.

    `result()` waits for them; an executor resolves the steps it has in flight in the
    order they were sent.
    """

    def __init__(self, wait: Callable[[float | None], None] | None = None) -> None:
        self._wait = wait
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
        # The wait often refers to this future (and through it to the worker and its
        # model): dropped once done, so the cycle does not hold them until a gc pass.
        self._wait = None

    def set_exception(self, error: BaseException) -> None:
        self._error, self._done, self._wait = error, True, None

    def result(self, timeout: float | None = None) -> ModelRunnerOutput:
        """The step's output; TimeoutError if it is not back within `timeout` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._done:
            self._wait(deadline)
        if self._error is not None:
            raise self._error
        return self._value


class Executor(ABC):
    """Runs the workers of one model replica set and relays steps to them.

    Under data parallelism each engine core has an executor of its own for its slice of
    the rank grid: `dp_rank` says which slice (its workers take the global ranks
    dp_rank x ranks_per_core onwards), and every core's workers join one torch.distributed
    world at the same `distributed_init_method`. With `initialize` False the workers are
    started but not initialized: the caller runs `load` and `allocate_kv_cache` itself, on
    every core at once (see executor.data_parallel), since the ranks of all cores meet in
    collectives from `init_device` on.
    """

    def __init__(self, config: EngineConfig, *, dp_rank: int = 0,
                 distributed_init_method: str | None = None, initialize: bool = True) -> None:
        self.config = config
        self.num_kv_blocks = 0
        dp = config.parallel.data_parallel_size
        if isinstance(dp_rank, bool) or not isinstance(dp_rank, int) or not 0 <= dp_rank < dp:
            raise ValueError(f"dp_rank={dp_rank!r} is invalid: must be an integer in [0, {dp}) "
                             f"for data_parallel_size={dp}")
        self.dp_rank = dp_rank
        self.ranks_per_core = config.parallel.world_size // dp
        self.first_rank = dp_rank * self.ranks_per_core
        self.distributed_init_method = distributed_init_method
        self._check_layout()
        self._guarded(self._start_workers)
        if initialize:
            self._guarded(lambda: self.allocate_kv_cache(self.load()))

    def _check_layout(self) -> None:
        """Refuse a layout this executor cannot run, before any worker starts."""
        check_layout(self.config)

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
        or with `non_block` a StepFuture of them, so that several steps can be in flight.
        An empty step is a dummy step (see Worker.execute_model): it samples nothing."""

    @property
    def max_concurrent_steps(self) -> int:
        """How many steps the engine should keep in flight: one per pipeline stage."""
        return self.config.parallel.pipeline_parallel_size

    @property
    def hides_host_time(self) -> bool:
        """Whether the workers compute beside the engine's Python (in other processes, or
        on a GPU), so that scheduling a step while another runs hides the engine's host
        time: where it holds (and the layout allows), async scheduling is on unless the
        configuration turns it off."""
        return True

    @abstractmethod
    def shutdown(self) -> None:
        """Release the workers; safe to call more than once."""

    def fail(self, error: EngineDeadError) -> None:
        """Stop serving because of something outside this executor (another data-parallel
        core died) or a failed start: calls waiting now and every later one raise `error`.
        The workers are released by `shutdown`. Nothing to do where no call can wait on
        another core."""

    def load(self) -> int:
        """Bring every worker up (joining the rank grid) and load its weights; return the
        KV blocks the tightest rank can hold."""
        self.collective_rpc("init_device")
        self.collective_rpc("load_model")
        return min(self.collective_rpc("determine_num_kv_blocks"))

    def allocate_kv_cache(self, num_blocks: int) -> None:
        """Give every worker a cache of `num_blocks` blocks and warm it up over that cache
        (kernel tuning and decode graphs, on GPUs)."""
        self.collective_rpc("initialize_cache", args=(num_blocks,))
        self.collective_rpc("warm_up")
        self.num_kv_blocks = num_blocks

    def _guarded(self, setup: Callable[[], None]) -> None:
        """Run a setup phase; if it fails, fail the executor, then release the workers
        before raising. Failed, it waits for no rank: after a rank's error the others may
        wait in a collective for it (init_device's rendezvous) until a gloo timeout."""
        try:
            setup()
        except BaseException as exc:
            self.fail(EngineDeadError(f"the executor failed to start: {type(exc).__name__}: "
                                      f"{exc}"))
            self.shutdown()
            raise

    def __enter__(self) -> "Executor":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()


def check_layout(config: EngineConfig, gpus: int | None = None) -> None:
    """Refuse, before any worker starts, a layout the model or the machine cannot take: a
    GPU device where torch sees none, or a split of the model (several ranks, or a list of
    layers per stage) that the model or the GPU count does not allow. `gpus` is the number
    of GPUs the ranks can use where that is not this machine's (a cluster's)."""
    import torch

    from shardline.models.loader import read_model_info
    from shardline.models.partition import check_partition
    from shardline.worker.worker import pick_device

    parallel = config.parallel
    if gpus is None:
        device = pick_device(0, parallel.device)
        gpus = torch.cuda.device_count() if device.type == "cuda" else None
        if gpus == 0:
            asked = (f"device={parallel.device!r}" if parallel.device is not None else
                     f"SHARDLINE_DEVICE={os.environ.get('SHARDLINE_DEVICE')!r}")
            raise ValueError(f"{asked} asks for {device}, but torch sees no GPU on this "
                             "machine: use device='cpu'")
    if (parallel.world_size > 1 or parallel.pipeline_stage_layers is not None
            or parallel.enable_expert_parallel):
        check_partition(parallel, read_model_info(config.model.model), gpus)


def executor_class(parallel: ParallelConfig) -> type[Executor]:
    """The executor for a layout: in process at world size 1 (unless "mp" is asked for),
    one process per rank on this machine otherwise, Ray actors on a cluster for "ray"."""
    backend = parallel.executor_backend
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
    from shardline.executor.ray import RayExecutor

    return RayExecutor


def create_executor(config: EngineConfig) -> Executor:
    """Build and start the executor (and so the workers) that `config` describes: one
    engine core's. Data parallelism needs one per core, started together
    (executor.data_parallel.create_data_parallel_executors)."""
    dp = config.parallel.data_parallel_size
    if dp > 1:
        raise ValueError(f"data_parallel_size={dp} needs one executor per engine core, "
                         "started together: use create_data_parallel_executors(config)")
    return executor_class(config.parallel)(config)

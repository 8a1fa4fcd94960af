"""A worker: one process's device, model slice and KV cache, driven by the executor."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable

import torch

from shardline.config import EngineConfig, ParallelConfig
from shardline.step import ModelRunnerOutput, SchedulerOutput
from shardline.step_times import StepTimes
from shardline.worker.kv_memory import kv_cache_budget
from shardline.worker.model_runner import ModelRunner

logger = logging.getLogger(__name__)


def pick_device(rank: int, requested: str | None = None) -> torch.device:
    """`requested` ("cpu" or "cuda"), else SHARDLINE_DEVICE if set (cpu, cuda, cuda:N), else
    this rank's GPU when there is one. Rank r takes GPU r modulo the GPUs present."""
    requested = requested or os.environ.get("SHARDLINE_DEVICE")
    if requested:
        device = torch.device(requested)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", rank % max(1, torch.cuda.device_count()))
        return device
    if torch.cuda.is_available():
        return torch.device("cuda", rank % torch.cuda.device_count())
    return torch.device("cpu")


RANKS_ON_NODE_ENV = "SHARDLINE_RANKS_ON_NODE"
"""How many ranks share this rank's node, where that is not every rank of the world: set
by the Ray executor for each rank actor (the multi-process executor runs every rank on
one machine)."""


def cpu_threads(parallel: ParallelConfig) -> int | None:
    """The torch threads of a CPU rank: None (torch's default, every core) for the one rank
    that runs in the engine's own process; else an equal share of the cores this process
    may run on among the ranks of its node (RANKS_ON_NODE_ENV, else the world size), less
    one core left to the engine's process (or, on another Ray node, to its node agent),
    at least 1.

    Every parallel region of torch's intra-op pool ends in a barrier of all its threads:
    when they and the engine's process outnumber the cores, each barrier can wait a
    scheduler slice for a preempted thread. On a busy 2-core machine a 4 ms step of
    tiny-llama then took 200 ms (bench/async_scheduling.py, bench/README)."""
    in_engine_process = (parallel.world_size == 1
                         and parallel.distributed_executor_backend in (None, "uni"))
    if in_engine_process:
        return None
    ranks = os.environ.get(RANKS_ON_NODE_ENV, str(parallel.world_size))
    if not ranks.isdigit() or not 1 <= int(ranks) <= parallel.world_size:
        raise ValueError(f"{RANKS_ON_NODE_ENV}={ranks!r} is invalid: must be the number of "
                         f"ranks on this node, an integer in [1, {parallel.world_size}]")
    cores = len(os.sched_getaffinity(0))
    return max(1, (cores - 1) // int(ranks))


class Worker:
    """The executor's handle on one rank: setup calls, then execute_model per step.

    With several ranks, `init_device` also joins the rank grid (its process groups) at
    `distributed_init_method`, before the model is built from this rank's slices.
    """

    def __init__(self, config: EngineConfig, rank: int = 0,
                 distributed_init_method: str | None = None):
        self.config = config
        self.rank = rank
        self.distributed_init_method = distributed_init_method
        self.device: torch.device | None = None
        self.model_runner: ModelRunner | None = None
        self.step_times = StepTimes()

    def init_device(self) -> None:
        self.device = pick_device(self.rank, self.config.parallel.device)
        world_size = self.config.parallel.world_size
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        elif (threads := cpu_threads(self.config.parallel)) is not None:
            torch.set_num_threads(threads)
        if world_size > 1:
            from shardline.distributed.parallel_state import init_distributed

            init_distributed(self.config.parallel, self.rank, self.distributed_init_method,
                             self.device)
        self.model_runner = ModelRunner(self.config, self.device)

    def shutdown(self) -> None:
        """Leave the rank grid (a no-op for a single rank)."""
        if self.config.parallel.world_size > 1:
            from shardline.distributed.parallel_state import destroy_distributed

            destroy_distributed()

    def load_model(self) -> None:
        self.model_runner.load_model()

    def determine_num_kv_blocks(self) -> int:
        """CacheConfig.num_blocks if set, else as many blocks as this rank's budget holds
        (kv_cache_memory_bytes, or a share of the memory free after loading the weights;
        see shardline.worker.kv_memory). Logs the capacity in tokens."""
        cache = self.config.cache
        block_bytes = self.model_runner.kv_block_bytes()
        if cache.num_blocks is not None:
            num_blocks, origin = cache.num_blocks, f"num_blocks={cache.num_blocks}"
        else:
            blocks_per_seq = -(-self.model_runner.max_model_len // cache.block_size)
            usable = self.config.scheduler.max_num_seqs * blocks_per_seq * block_bytes
            budget = kv_cache_budget(cache, self.device, self.config.parallel.world_size, usable)
            num_blocks, origin = budget.num_bytes // block_bytes, budget.origin
            if num_blocks < 1 and cache.kv_cache_memory_bytes is not None:
                raise ValueError(f"kv_cache_memory_bytes={cache.kv_cache_memory_bytes} is too "
                                 f"small: one KV block of this model needs {block_bytes} bytes")
            if num_blocks < 1:
                raise ValueError(f"no memory is left for the KV cache ({origin}): one block "
                                 f"needs {block_bytes} bytes; raise gpu_memory_utilization or "
                                 "free memory, or set kv_cache_memory_bytes or num_kv_blocks")
        logger.info("KV cache: %d blocks x %d tokens = %d tokens, %.1f MiB (%s)",
                    num_blocks, cache.block_size, num_blocks * cache.block_size,
                    num_blocks * block_bytes / (1 << 20), origin)
        return num_blocks

    def initialize_cache(self, num_blocks: int) -> None:
        self.model_runner.initialize_cache(num_blocks)

    def warm_up(self) -> None:
        """On CUDA: tune the kernels for every shape bucket and capture the decode graphs."""
        self.model_runner.warm_up()

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        return self.queue_step(scheduler_output)()

    def queue_step(self, scheduler_output: SchedulerOutput
                   ) -> Callable[[], ModelRunnerOutput]:
        """Queue the step on the device; the returned call waits for its output (see
        ModelRunner.queue_step). The step's time runs from here to that wait's end."""
        start = time.perf_counter()
        read = self.model_runner.queue_step(scheduler_output)

        def wait() -> ModelRunnerOutput:
            output = read()
            self.step_times.record(time.perf_counter() - start)
            return output
        return wait

    def step_time_stats(self) -> dict[str, float | int | None]:
        """This rank's `execute_model` times (see StepTimes.summary), waits on its peers
        in collectives included, so a slow rank shows as the others waiting. On a GPU a
        rank that samples nothing may return once its kernels are queued: no sync is added
        for the measurement, so there its time is partly host time."""
        return self.step_times.summary()

    def score(self, scheduler_output: dict) -> dict:
        """Logits of every scheduled token per request, for the step `scheduler_output`
        (in its dict form, as collective_rpc carries it); empty except on the output rank."""
        return self.model_runner.score(SchedulerOutput.from_dict(scheduler_output))

    def comm_stats(self, reset: bool = False) -> dict[str, dict[str, dict[str, int]]]:
        """Bytes this rank sent and calls it made, per group and operation, since the last
        reset (see ParallelState.comm_stats); empty for a single rank. `reset` zeroes the
        counters after reading them, so a benchmark can count one run's traffic alone."""
        from shardline.distributed.parallel_state import get_parallel_state

        state = get_parallel_state()
        if state is None:
            return {}
        stats = state.comm_stats()
        if reset:
            state.reset_comm_stats()
        return stats

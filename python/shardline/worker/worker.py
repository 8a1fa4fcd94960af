"""A worker: one process's device, model slice and KV cache, driven by the executor."""

from __future__ import annotations

import os

import torch

from shardline.config import EngineConfig
from shardline.step import ModelRunnerOutput, SchedulerOutput
from shardline.worker.model_runner import ModelRunner


def pick_device(rank: int) -> torch.device:
    """SHARDLINE_DEVICE if set (cpu, cuda, cuda:N); else this rank's GPU when there is one."""
    requested = os.environ.get("SHARDLINE_DEVICE")
    if requested:
        device = torch.device(requested)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", rank % max(1, torch.cuda.device_count()))
        return device
    if torch.cuda.is_available():
        return torch.device("cuda", rank % torch.cuda.device_count())
    return torch.device("cpu")


class Worker:
    """The executor's handle on one rank: setup calls, then execute_model per step."""

    def __init__(self, config: EngineConfig, rank: int = 0):
        self.config = config
        self.rank = rank
        self.device: torch.device | None = None
        self.model_runner: ModelRunner | None = None

    def init_device(self) -> None:
        self.device = pick_device(self.rank)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.model_runner = ModelRunner(self.config, self.device)

    def load_model(self) -> None:
        self.model_runner.load_model()

    def determine_num_kv_blocks(self) -> int:
        """CacheConfig.num_blocks if set, else as many blocks as kv_cache_memory_bytes holds."""
        cache = self.config.cache
        if cache.num_blocks is not None:
            return cache.num_blocks
        block_bytes = self.model_runner.kv_block_bytes()
        num_blocks = cache.kv_cache_memory_bytes // block_bytes
        if num_blocks < 1:
            raise ValueError(f"kv_cache_memory_bytes={cache.kv_cache_memory_bytes} is too small: "
                             f"one KV block of this model needs {block_bytes} bytes")
        return num_blocks

    def initialize_cache(self, num_blocks: int) -> None:
        self.model_runner.initialize_cache(num_blocks)

    def warm_up(self) -> None:
        """On CUDA: tune the kernels for every shape bucket and capture the decode graphs."""
        self.model_runner.warm_up()

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        return self.model_runner.execute_model(scheduler_output)

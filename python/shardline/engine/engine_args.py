"""The flat keyword options of LLM and AsyncLLM (vLLM-style), turned into an EngineConfig."""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, fields

from shardline.config import (CacheConfig, EngineConfig, ModelConfig, ParallelConfig,
                              SchedulerConfig)
from shardline.presets import resolve_model


@dataclass
class EngineArgs:
    """Every engine option in one flat list; `model` is a model directory (a str or a path),
    a .gguf file or a preset name.

    `num_kv_blocks` fixes the KV cache size (tests use it to force preemption); when None
    each worker sizes its cache from `kv_cache_memory_bytes` if set, else from the memory
    free after loading the model (`gpu_memory_utilization` of a GPU; see CacheConfig).
    `dtype` "auto" is float32 on the CPU and the checkpoint's dtype on a GPU. `device` and
    `pipeline_stage_layers` are ParallelConfig's (the device of every rank; layers per stage),
    as is `ray_address` (the cluster of distributed_executor_backend="ray") and
    `step_timeout_s` (how long a step of worker processes may take before the engine fails).
    """

    model: str | os.PathLike[str]
    dtype: str = "auto"
    max_model_len: int | None = None
    seed: int = 0
    enforce_eager: bool = False
    max_logprobs: int = 20
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    enable_chunked_prefill: bool = True
    async_scheduling: bool | None = None
    block_size: int = 16
    num_kv_blocks: int | None = None
    kv_cache_memory_bytes: int | None = None
    gpu_memory_utilization: float = 0.9
    enable_prefix_caching: bool = True
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    data_parallel_size: int = 1
    sequence_parallel_size: int = 1
    enable_expert_parallel: bool = False
    distributed_executor_backend: str | None = None
    pipeline_stage_layers: list[int] | None = None
    device: str | None = None
    ray_address: str | None = None
    step_timeout_s: float | None = None

    @classmethod
    def from_options(cls, owner: str, model: str | os.PathLike[str], options: dict
                     ) -> "EngineArgs":
        """EngineArgs(model, **options) for `owner` (LLM, AsyncLLM): an unknown option is a
        TypeError naming the owner and the option, with the options close to it (a typo)
        or, failing those, all of them."""
        known = [f.name for f in fields(cls) if f.name != "model"]
        for name in options:
            if name not in known:
                close = difflib.get_close_matches(name, known, n=3)
                hint = (f"did you mean {' or '.join(map(repr, close))}?" if close
                        else f"the options are {', '.join(known)}")
                raise TypeError(f"{owner}() got an unknown option {name!r}: {hint}")
        return cls(model, **options)

    def to_config(self) -> EngineConfig:
        """The EngineConfig of these options (each config checks its own values)."""
        if not isinstance(self.model, (str, os.PathLike)):
            raise ValueError(f"model={self.model!r} ({type(self.model).__name__}) is invalid: "
                             "must be a model directory, a .gguf file or a preset name")
        return EngineConfig(
            model=ModelConfig(model=resolve_model(os.fspath(self.model)), dtype=self.dtype,
                              max_model_len=self.max_model_len, seed=self.seed,
                              enforce_eager=self.enforce_eager,
                              max_logprobs=self.max_logprobs),
            cache=CacheConfig(block_size=self.block_size, num_blocks=self.num_kv_blocks,
                              kv_cache_memory_bytes=self.kv_cache_memory_bytes,
                              gpu_memory_utilization=self.gpu_memory_utilization,
                              enable_prefix_caching=self.enable_prefix_caching),
            scheduler=SchedulerConfig(max_num_seqs=self.max_num_seqs,
                                      max_num_batched_tokens=self.max_num_batched_tokens,
                                      enable_chunked_prefill=self.enable_chunked_prefill,
                                      async_scheduling=self.async_scheduling),
            parallel=ParallelConfig(tensor_parallel_size=self.tensor_parallel_size,
                                    pipeline_parallel_size=self.pipeline_parallel_size,
                                    data_parallel_size=self.data_parallel_size,
                                    sequence_parallel_size=self.sequence_parallel_size,
                                    enable_expert_parallel=self.enable_expert_parallel,
                                    distributed_executor_backend=self.distributed_executor_backend,
                                    pipeline_stage_layers=self.pipeline_stage_layers,
                                    device=self.device, ray_address=self.ray_address,
                                    step_timeout_s=self.step_timeout_s),
        )

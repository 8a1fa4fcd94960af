"""Engine configuration: model, cache, scheduler and parallel layout, validated up front.

Every check names the argument, the value it got and what is allowed, so a bad setting
fails at construction and not deep inside a worker.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# Names, not torch dtypes: the CLI and the planner read these configs without loading torch.
_DTYPES = {
    "float32": "float32",
    "fp32": "float32",
    "float": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
}

EXPERT_DISPATCH_PATHS = ("all_to_all", "all_gather")
# What SHARDLINE_DEVICE may say: the ranks parse it with torch.device, whose error for
# anything else lists a score of device types shardline cannot run on.
DEVICE_ENV = re.compile(r"cpu|cuda(:\d+)?")
BLOCK_SIZES = tuple(2**i for i in range(9))


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """Map a dtype name (or torch dtype) to one of the supported torch dtypes."""
    import torch

    if isinstance(dtype, torch.dtype):
        if dtype_name(dtype) in _DTYPES.values():
            return dtype
    elif isinstance(dtype, str) and dtype.lower() in _DTYPES:
        return getattr(torch, _DTYPES[dtype.lower()])
    raise ValueError(f"dtype={dtype!r} is not supported: use one of float32, bfloat16, float16")


def is_dtype_name(name: str) -> bool:
    """Whether `name` is a dtype an engine takes: "auto" or a name resolve_dtype maps."""
    return name.lower() == "auto" or name.lower() in _DTYPES


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _require(ok: bool, name: str, value: object, allowed: str) -> None:
    if not ok:
        raise ValueError(f"{name}={value!r} is invalid: must be {allowed}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _require_bools(config: object, *names: str) -> None:
    for name in names:
        _require(isinstance(getattr(config, name), bool), name, getattr(config, name),
                 "True or False")


@dataclass
class ModelConfig:
    """Which checkpoint to serve and at what precision and length.

    `dtype` "auto" runs in float32 on the CPU and, on a GPU, in the checkpoint's own
    precision (`torch_dtype` in its config.json, typically bfloat16); the worker resolves
    it once it knows its device (`resolve_torch_dtype`). On CUDA, decode steps replay CUDA
    graphs captured at startup; `enforce_eager` runs every step op by op instead (slower,
    no capture time or graph memory). `max_logprobs` bounds the top-n of a request's
    `logprobs` and `prompt_logprobs` (-1: the vocabulary size): each position's n entries
    stay in the engine's memory, and a whole distribution per token would grow it by
    megabytes a token.
    """

    model: str
    dtype: str = "auto"
    max_model_len: int | None = None
    seed: int = 0
    enforce_eager: bool = False
    max_logprobs: int = 20

    def __post_init__(self) -> None:
        if isinstance(self.dtype, str) and self.dtype.lower() == "auto":
            self.dtype = "auto"
        else:
            try:
                self.dtype = dtype_name(resolve_dtype(self.dtype))
            except ValueError:
                raise ValueError(f"dtype={self.dtype!r} is not supported: use auto, float32, "
                                 "bfloat16 or float16") from None
        _require(self.max_model_len is None or (_is_int(self.max_model_len)
                                                and self.max_model_len >= 1),
                 "max_model_len", self.max_model_len,
                 "None (use the checkpoint's) or an integer >= 1")
        _require(_is_int(self.seed) and -2**63 <= self.seed < 2**64, "seed", self.seed,
                 "an integer from -2**63 to 2**64 - 1")
        _require_bools(self, "enforce_eager")
        _require(_is_int(self.max_logprobs) and self.max_logprobs >= -1, "max_logprobs",
                 self.max_logprobs, "-1 (up to the vocabulary size) or an integer >= 0")

    def resolve_torch_dtype(self, device_type: str, checkpoint_dtype: str | None
                            ) -> torch.dtype:
        """The precision to run in on a `device_type` ("cpu", "cuda") device, given the
        checkpoint's declared dtype (None if its config.json names none: float32)."""
        if self.dtype != "auto":
            return resolve_dtype(self.dtype)
        if device_type == "cpu" or checkpoint_dtype is None:
            return resolve_dtype("float32")
        try:
            return resolve_dtype(checkpoint_dtype)
        except ValueError:
            raise ValueError(f"dtype='auto' takes the checkpoint's torch_dtype="
                             f"{checkpoint_dtype!r}, which is not supported: pass dtype="
                             "float32, bfloat16 or float16") from None


@dataclass
class CacheConfig:
    """Paged KV cache: its block size and how many blocks each rank holds.

    By default each rank sizes its cache from the memory free after loading its weights:
    on a GPU, `gpu_memory_utilization` of the device's total memory minus what is in use
    by then (this and every other process: weights, CUDA context); the rest is headroom
    for activations and CUDA graphs. On the CPU, half of MemAvailable shared by the ranks
    of the machine, at most 4 GiB per rank and at most what `max_num_seqs` sequences of
    `max_model_len` tokens fill. `kv_cache_memory_bytes` fixes the budget per rank
    instead, and `num_blocks` the block count itself (it wins over both; LLM's
    `num_kv_blocks`, the name its errors give).
    """

    block_size: int = 16
    num_blocks: int | None = None
    kv_cache_memory_bytes: int | None = None
    gpu_memory_utilization: float = 0.9
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        _require(_is_int(self.block_size) and self.block_size in BLOCK_SIZES, "block_size",
                 self.block_size, "a power of two from 1 to 256")
        _require(self.num_blocks is None or (_is_int(self.num_blocks) and self.num_blocks >= 1),
                 "num_kv_blocks", self.num_blocks,
                 "None (size the cache from memory) or an integer >= 1")
        _require(self.kv_cache_memory_bytes is None or (_is_int(self.kv_cache_memory_bytes)
                                                        and self.kv_cache_memory_bytes >= 1),
                 "kv_cache_memory_bytes", self.kv_cache_memory_bytes,
                 "None (size the cache from free memory) or an integer >= 1")
        _require_bools(self, "enable_prefix_caching")
        _require(isinstance(self.gpu_memory_utilization, (int, float))
                 and not isinstance(self.gpu_memory_utilization, bool)
                 and 0.0 < self.gpu_memory_utilization <= 1.0, "gpu_memory_utilization",
                 self.gpu_memory_utilization, "in (0, 1]: the share of a GPU's memory this "
                 "process may fill")


@dataclass
class SchedulerConfig:
    """Continuous batching limits: sequences and tokens per step.

    The token budget covers at least one token per sequence, or a step could not decode
    every running sequence and the latest ones would wait behind the others' tokens.
    With chunked prefill off, a prompt must fit the token budget in one step; a request
    resumed after preemption may still be recomputed in chunks.

    `async_scheduling` lets the engine schedule step N+1 while the device runs step N (see
    engine.scheduler). It needs one pipeline stage and no sequence parallelism. None turns
    it on where it hides host time: where the ranks compute beside the engine (on a GPU, or
    in worker processes), except for tensor-parallel ranks on the CPU (see
    engine.llm_engine.uses_async_scheduling).
    """

    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    enable_chunked_prefill: bool = True
    async_scheduling: bool | None = None

    def __post_init__(self) -> None:
        _require(self.async_scheduling is None or isinstance(self.async_scheduling, bool),
                 "async_scheduling",
                 self.async_scheduling, "None (automatic), True or False")
        _require_bools(self, "enable_chunked_prefill")
        _require(_is_int(self.max_num_seqs) and self.max_num_seqs >= 1, "max_num_seqs",
                 self.max_num_seqs, "an integer >= 1")
        _require(_is_int(self.max_num_batched_tokens)
                 and self.max_num_batched_tokens >= self.max_num_seqs, "max_num_batched_tokens",
                 self.max_num_batched_tokens, f"an integer >= max_num_seqs={self.max_num_seqs}, "
                 "so that every running sequence can decode its token in each step")


@dataclass
class ParallelConfig:
    """The rank grid: world = DP x PP x SP x TP (TP innermost); EP reuses DP x SP x TP.

    `enable_expert_parallel` gives each rank of the EP group whole experts of every MoE
    layer instead of a TP slice of all of them; `expert_dispatch` is how tokens reach
    their experts' ranks then: "all_to_all" (each rank sends its tokens only to the ranks
    owning their chosen experts) or "all_gather" (every rank gathers every token and the
    outputs are reduce-scattered back); see shardline.layers.expert_parallel.

    `pipeline_stage_layers` overrides the balanced split of layers over pipeline stages
    (one layer count per stage). `device` is "cpu", "cuda" or None (the SHARDLINE_DEVICE
    environment variable if set, else CUDA when present). `worker_cls` is the dotted path
    of the class each rank runs (the model worker unless a tool swaps in another).
    `ray_address` is the Ray cluster the "ray" backend joins (None: RAY_ADDRESS if set,
    else a local cluster it starts). `step_timeout_s` bounds how long the engine waits for
    a step's tokens from workers outside its process: past it the workers are stopped and
    the engine fails with EngineDeadError (a supervisor restarts it); None, the default,
    only reports a slow step, since a long prefill on a slow CPU is legitimate.
    """

    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    data_parallel_size: int = 1
    sequence_parallel_size: int = 1
    enable_expert_parallel: bool = False
    expert_dispatch: str = "all_to_all"
    distributed_executor_backend: str | None = None
    pipeline_stage_layers: list[int] | None = None
    device: str | None = None
    worker_cls: str = "shardline.worker.worker.Worker"
    ray_address: str | None = None
    step_timeout_s: float | None = None

    def __post_init__(self) -> None:
        for name in ("tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size",
                     "sequence_parallel_size"):
            value = getattr(self, name)
            _require(_is_int(value) and value >= 1, name, value, "an integer >= 1")
        _require(self.expert_dispatch in EXPERT_DISPATCH_PATHS, "expert_dispatch",
                 self.expert_dispatch, f"one of {EXPERT_DISPATCH_PATHS}")
        _require_bools(self, "enable_expert_parallel")
        _require(self.distributed_executor_backend in (None, "uni", "mp", "ray"),
                 "distributed_executor_backend", self.distributed_executor_backend,
                 "None (automatic), 'uni', 'mp' or 'ray'")
        _require(self.device in (None, "cpu", "cuda"), "device", self.device,
                 "None (automatic), 'cpu' or 'cuda'")
        env_device = os.environ.get("SHARDLINE_DEVICE")
        if self.device is None and env_device and not DEVICE_ENV.fullmatch(env_device):
            raise ValueError(f"SHARDLINE_DEVICE={env_device!r} is invalid: must be cpu, cuda "
                             "or cuda:N (or unset, for the rank's GPU if there is one, else "
                             "the CPU)")
        if self.pipeline_stage_layers is not None:
            layers = self.pipeline_stage_layers
            _require(isinstance(layers, (list, tuple))
                     and len(layers) == self.pipeline_parallel_size
                     and all(_is_int(n) and n >= 1 for n in layers),
                     "pipeline_stage_layers", self.pipeline_stage_layers,
                     f"None or a list of {self.pipeline_parallel_size} layer counts (one per "
                     "pipeline stage), each >= 1")
            self.pipeline_stage_layers = list(layers)
        _require(isinstance(self.worker_cls, str) and "." in self.worker_cls, "worker_cls",
                 self.worker_cls, "a dotted path such as 'shardline.worker.worker.Worker'")
        _require(self.ray_address is None or (isinstance(self.ray_address, str)
                                              and self.ray_address), "ray_address",
                 self.ray_address, "None or a Ray cluster address such as 'auto' or "
                 "'ray://head:10001'")
        _require(self.ray_address is None or self.distributed_executor_backend == "ray",
                 "ray_address", self.ray_address, "None unless distributed_executor_backend="
                 f"'ray' (it is {self.distributed_executor_backend!r})")
        timeout = self.step_timeout_s
        _require(timeout is None or (isinstance(timeout, (int, float))
                                     and not isinstance(timeout, bool)
                                     and 0 < timeout < math.inf),
                 "step_timeout_s", timeout, "None or a number of seconds > 0")
        _require(timeout is None or self.executor_backend != "uni", "step_timeout_s", timeout,
                 "None where the one rank runs in the engine's own process (the engine cannot "
                 "stop its own step): use distributed_executor_backend='mp'")

    @property
    def executor_backend(self) -> str:
        """The executor that runs the layout: `distributed_executor_backend`, or where it
        is None, "uni" (in process) for one rank and "mp" for more."""
        if self.distributed_executor_backend is not None:
            return self.distributed_executor_backend
        return "uni" if self.world_size == 1 else "mp"

    @property
    def world_size(self) -> int:
        return (self.tensor_parallel_size * self.pipeline_parallel_size
                * self.data_parallel_size * self.sequence_parallel_size)

    @property
    def output_rank(self) -> int:
        """The rank that returns sampled tokens: the first TP rank of the last PP stage."""
        return ((self.pipeline_parallel_size - 1) * self.sequence_parallel_size
                * self.tensor_parallel_size)


@dataclass
class EngineConfig:
    """Everything an executor and its workers need to build themselves."""

    model: ModelConfig
    cache: CacheConfig
    scheduler: SchedulerConfig
    parallel: ParallelConfig

    def __post_init__(self) -> None:
        parallel = self.parallel
        sizes = {"pipeline_parallel_size": parallel.pipeline_parallel_size,
                 "sequence_parallel_size": parallel.sequence_parallel_size}
        split = {name: size for name, size in sizes.items() if size > 1}
        if self.scheduler.async_scheduling and split:
            layout = ", ".join(f"{name}={size}" for name, size in split.items())
            raise ValueError(f"async_scheduling=True needs one pipeline stage and no sequence "
                             f"parallelism, but {layout}: a pipeline keeps its own steps in "
                             "flight, and sequence-parallel ranks would each need the tokens "
                             "of others; use async_scheduling=None or False with this layout")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "EngineConfig":
        return cls(
            model=ModelConfig(**data["model"]),
            cache=CacheConfig(**data["cache"]),
            scheduler=SchedulerConfig(**data["scheduler"]),
            parallel=ParallelConfig(**data["parallel"]),
        )

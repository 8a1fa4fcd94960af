"""How a model is cut over the rank grid: layers over pipeline stages, heads over TP ranks,
experts over the EP group.

`check_partition` runs in the engine's process before any worker starts, so a layout the
model cannot take fails at once, with the value, the rule and what would work.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from shardline.config import ParallelConfig
from shardline.distributed.grid import RankGrid

if TYPE_CHECKING:
    from shardline.models.loader import ModelInfo


def stage_layer_counts(num_layers: int, num_stages: int,
                       override: list[int] | None = None) -> list[int]:
    """Layers per pipeline stage: `override` when given, else as even as possible with the
    extra layers on the earliest stages (the last stage also runs the norm and LM head)."""
    if override is not None:
        if sum(override) != num_layers:
            raise ValueError(f"pipeline_stage_layers={override} adds up to {sum(override)} "
                             f"layers, but the model has {num_layers}: give "
                             f"{num_stages} counts that add up to {num_layers}")
        return list(override)
    if num_layers < num_stages:
        raise ValueError(f"pipeline_parallel_size={num_stages} is larger than the model's "
                         f"{num_layers} layers: use at most {num_layers} stages")
    base, extra = divmod(num_layers, num_stages)
    return [base + (1 if stage < extra else 0) for stage in range(num_stages)]


def stage_layer_range(num_layers: int, num_stages: int, stage: int,
                      override: list[int] | None = None) -> range:
    """The layer indices that pipeline stage `stage` runs."""
    counts = stage_layer_counts(num_layers, num_stages, override)
    start = sum(counts[:stage])
    return range(start, start + counts[stage])


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def check_partition(parallel: ParallelConfig, info: ModelInfo,
                    cuda_devices: int | None = None) -> None:
    """Raise ValueError if `info`'s model cannot be split as `parallel` asks.

    KV heads are replicated when TP (times SP) exceeds them (each rank then holds one),
    which needs TP (times SP) to be a multiple of the KV-head count. With
    enable_expert_parallel the model must have experts, as many on every EP rank
    (check_expert_partition). `cuda_devices` is the number of GPUs when the ranks run on
    CUDA (None on CPU).
    """
    tp, sp = parallel.tensor_parallel_size, parallel.sequence_parallel_size
    heads, kv_heads = info.num_attention_heads, info.num_key_value_heads
    usable = [d for d in _divisors(heads) if kv_heads % d == 0 or d % kv_heads == 0]
    # Attention heads are split over TP x SP ranks (SP splits each TP rank's heads), and
    # the same rules hold for the product as for TP alone.
    split, name = tp * sp, f"tensor_parallel_size={tp}"
    if sp > 1:
        name += f" x sequence_parallel_size={sp} = {split}"
    if heads % split:
        raise ValueError(f"{name} does not divide the model's {heads} attention heads: use "
                         f"{'one of' if sp == 1 else 'a product in'} {usable}")
    if kv_heads % split and split % kv_heads:
        raise ValueError(f"{name} and the model's {kv_heads} KV heads: the heads' split must "
                         "divide the KV heads, or be a multiple of them (each KV head is then "
                         f"replicated on {split}/{kv_heads} ranks): use "
                         f"{'one of' if sp == 1 else 'a product in'} {usable}")
    stage_layer_counts(info.num_hidden_layers, parallel.pipeline_parallel_size,
                       parallel.pipeline_stage_layers)
    if parallel.enable_expert_parallel:
        check_expert_partition(parallel, info)
    if cuda_devices is not None and parallel.world_size > cuda_devices:
        raise ValueError(f"the layout needs {parallel.world_size} ranks (tensor_parallel_size="
                         f"{tp} x pipeline_parallel_size={parallel.pipeline_parallel_size} x "
                         f"data_parallel_size={parallel.data_parallel_size} x "
                         f"sequence_parallel_size={parallel.sequence_parallel_size}) but this "
                         f"machine has {cuda_devices} GPUs: use at most {cuda_devices} ranks, "
                         "or device='cpu'")


def check_expert_partition(parallel: ParallelConfig, info: ModelInfo) -> None:
    """Expert parallelism needs experts, and an EP group (DP x SP x TP ranks of a pipeline
    stage) that divides them, so that every rank owns the same number."""
    ep = RankGrid.from_sizes(parallel).size("ep")
    if not info.num_experts:
        raise ValueError(f"enable_expert_parallel=True, but {info.architecture} is a dense "
                         "model with no experts to split: set enable_expert_parallel=False")
    if info.num_experts % ep:
        raise ValueError(f"enable_expert_parallel=True splits the model's {info.num_experts} "
                         f"experts over an EP group of {ep} ranks (data_parallel_size="
                         f"{parallel.data_parallel_size} x sequence_parallel_size="
                         f"{parallel.sequence_parallel_size} x tensor_parallel_size="
                         f"{parallel.tensor_parallel_size}), which does not divide them: use "
                         f"an EP size in {_divisors(info.num_experts)}, or set "
                         "enable_expert_parallel=False")

"""Every layout of a model on a cluster, each valid one kept and each other one with the
reason it was refused.

The model's own rules are shardline's: check_partition (heads and KV heads over TP x SP,
layers over PP, experts over the EP group) runs on each candidate as the engine would
run it before starting any worker. The planner adds one rule of its own: the busiest
rank's weights and activations must fit, with room in the KV cache for at least one
whole request.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from shardline.config import ParallelConfig
from shardline.models.partition import check_partition
from shardline.planner.cluster import ClusterSpec
from shardline.planner.cost import Layout, Workload, memory
from shardline.planner.model_spec import ModelSpec


@dataclass(frozen=True)
class Rejected:
    layout: Layout
    reason: str


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidates(world_size: int, moe: bool) -> list[Layout]:
    """Every TP x PP x SP x DP factorization of `world_size`, each with EP off and, for
    an MoE model with more than one rank per stage, on."""
    out = []
    for tp in _divisors(world_size):
        for sp in _divisors(world_size // tp):
            for pp in _divisors(world_size // (tp * sp)):
                layout = Layout(tp=tp, pp=pp, sp=sp, dp=world_size // (tp * sp * pp))
                out.append(layout)
                if moe and layout.dp * layout.sp * layout.tp > 1:
                    out.append(replace(layout, expert_parallel=True))
    return out


def partition_error(model: ModelSpec, layout: Layout) -> str | None:
    """Why shardline cannot split `model` as `layout` does, or None if it can."""
    try:
        check_partition(ParallelConfig(tensor_parallel_size=layout.tp,
                                       pipeline_parallel_size=layout.pp,
                                       data_parallel_size=layout.dp,
                                       sequence_parallel_size=layout.sp,
                                       enable_expert_parallel=layout.expert_parallel),
                        model.model_info())
    except ValueError as exc:
        return str(exc)
    return None


def enumerate_layouts(model: ModelSpec, cluster: ClusterSpec, workload: Workload
                      ) -> tuple[list[Layout], list[Rejected]]:
    """(valid layouts, refused ones with their reason) over all of the cluster's devices."""
    valid, rejected = [], []
    for layout in candidates(cluster.world_size, model.num_experts > 0):
        reason = partition_error(model, layout)
        if reason is None:
            mem = memory(model, layout, cluster, workload)
            need = workload.prompt_len + workload.output_len
            if mem.kv_capacity_tokens < need:
                reason = (f"does not fit: {mem.weights_bytes / 1e9:.1f} GB of weights per "
                          f"device leave room for {mem.kv_capacity_tokens} KV tokens, one "
                          f"request needs {need}")
        if reason is None:
            valid.append(layout)
        else:
            rejected.append(Rejected(layout, reason))
    return valid, rejected

"""Memory and time of one layout serving one workload: the planner's cost model.

Per rank and per pipeline stage (the busiest stage counts), a step costs its compute, a
roofline max(flops / rate, bytes / bandwidth) (on a CPU, plus the KV cache read at the
reference attention's own rate), the engine's host time (per step and per layer call of
the stage, each with a part per sequence; ranks beyond a CPU's cores share them), and
then its collectives (collectives.py; on a CPU whose ranks outnumber its cores each call
also waits for a rank to get its core back), with no overlap between them. Decode runs the
workload's sequences in PP microbatches kept in flight, so a stage's step is the
pipeline's interval and a token of one sequence takes PP intervals; prefill pushes the
prompts through in chunks of the token budget. Traffic follows shardline's layers: TP
all-reduces the hidden state after attention and after the MLP and once after the
vocab-parallel embedding, and gathers the logits to its first rank; PP sends hidden
state and residual; SP (Ulysses) swaps token shards for head shards around attention
with two all-to-alls and gathers the final hidden states; EP sends each token to the
ranks owning its experts and back (layers/expert_parallel.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from shardline.distributed.grid import RankGrid
from shardline.models.partition import stage_layer_counts
from shardline.planner.cluster import ClusterSpec
from shardline.planner.collectives import CommCost, collective_cost
from shardline.planner.model_spec import ModelSpec

ACTIVATION_BYTES = 4  # activations and logits are sized as fp32


@dataclass(frozen=True)
class Layout:
    """Sizes of the rank grid; `expert_parallel` spreads whole experts over the
    DP x SP x TP ranks of a stage instead of slicing each expert over TP."""

    tp: int = 1
    pp: int = 1
    sp: int = 1
    dp: int = 1
    expert_parallel: bool = False

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.sp * self.dp

    @property
    def ep(self) -> int:
        return self.dp * self.sp * self.tp if self.expert_parallel else 1

    @property
    def grid(self) -> RankGrid:
        return RankGrid(dp=self.dp, pp=self.pp, sp=self.sp, tp=self.tp)

    @property
    def name(self) -> str:
        parts = [f"{k.upper()}{v}" for k, v in (("dp", self.dp), ("pp", self.pp),
                                                 ("sp", self.sp), ("tp", self.tp)) if v > 1]
        if self.expert_parallel:
            parts.append(f"EP{self.ep}")
        return "x".join(parts) or "single"


@dataclass(frozen=True)
class Workload:
    """`batch` concurrent requests of `prompt_len` prompt and `output_len` output tokens;
    prefill runs in chunks of at most `max_num_batched_tokens` tokens per step."""

    batch: int
    prompt_len: int
    output_len: int
    max_num_batched_tokens: int = 2048
    gpu_memory_utilization: float = 0.9

    def __post_init__(self) -> None:
        for name in ("batch", "prompt_len", "output_len", "max_num_batched_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} is invalid: must be an integer >= 1")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization={self.gpu_memory_utilization!r} is "
                             "invalid: must be in (0, 1]")


@dataclass(frozen=True)
class Memory:
    """One rank's memory on the busiest stage, and the KV tokens a replica holds."""

    weights_bytes: float
    activation_bytes: float
    kv_bytes_per_token: float
    kv_capacity_tokens: int


@dataclass(frozen=True)
class StepCost:
    """One step of the busiest stage on one rank: the kernels' work, the engine's host
    time around them, and the collectives."""

    compute_s: float
    memory_bound: bool
    comm: CommCost
    host_s: float = 0.0

    @property
    def time_s(self) -> float:
        return self.compute_s + self.host_s + self.comm.time_s


def _stage_layers(model: ModelSpec, layout: Layout) -> list[tuple[int, int]]:
    """(dense layers, MoE layers) per stage; MoE layers spread in proportion."""
    counts = stage_layer_counts(model.num_layers, layout.pp)
    stages, start = [], 0
    for count in counts:
        moe = round(model.moe_layers * (start + count) / model.num_layers) - round(
            model.moe_layers * start / model.num_layers)
        stages.append((count - moe, moe))
        start += count
    return stages


def _kv_heads_per_rank(model: ModelSpec, shards: int) -> int:
    """KV heads a rank holds when heads are split `shards` ways (replicated past them)."""
    return max(1, model.kv_heads // shards)


def _layer_weights(model: ModelSpec, layout: Layout, moe: bool) -> float:
    """Weight elements of one layer on one rank."""
    q = model.heads * model.head_dim // layout.tp
    kv = _kv_heads_per_rank(model, layout.tp) * model.head_dim
    attention = model.hidden * (2 * q + 2 * kv) + 2 * model.hidden
    if not moe:
        return attention + 3 * model.hidden * model.intermediate / layout.tp
    experts = model.num_experts * model.expert_params()
    experts /= layout.ep if layout.expert_parallel else layout.tp
    shared = 3 * model.hidden * model.shared_intermediate / layout.tp
    return attention + experts + shared + model.hidden * model.num_experts


def _stage_weights(model: ModelSpec, layout: Layout, stage: int, dense: int, moe: int) -> float:
    elements = dense * _layer_weights(model, layout, False) + moe * _layer_weights(
        model, layout, True)
    embedding = model.vocab * model.hidden / layout.tp
    first, last = stage == 0, stage == layout.pp - 1
    elements += embedding * (first + (last and not (first and model.tie_embeddings)))
    return elements * model.dtype_bytes


def memory(model: ModelSpec, layout: Layout, cluster: ClusterSpec,
           workload: Workload) -> Memory:
    """Weights, activation headroom and KV capacity of the busiest stage's ranks."""
    stages = _stage_layers(model, layout)
    weights = max(_stage_weights(model, layout, s, d, m) for s, (d, m) in enumerate(stages))
    layers = max(d + m for d, m in stages)
    kv_heads = _kv_heads_per_rank(model, layout.tp * layout.sp)
    kv_per_token = 2 * layers * kv_heads * model.head_dim * model.dtype_bytes
    tokens = workload.max_num_batched_tokens / layout.sp
    inter = max(model.intermediate, model.moe_intermediate * model.experts_per_token)
    activations = tokens * (8 * model.hidden + 2 * inter / layout.tp
                            + model.vocab / layout.tp) * ACTIVATION_BYTES
    free = cluster.device.memory_bytes * workload.gpu_memory_utilization - weights - activations
    capacity = max(0, int(free // kv_per_token))
    return Memory(weights, activations, kv_per_token, capacity)


def _experts_touched(experts: int, chosen: int, tokens: float) -> float:
    """Expected share of `experts` experts that at least one of `tokens` tokens picks,
    each choosing `chosen` distinct experts uniformly."""
    return 1.0 - (1.0 - chosen / experts) ** tokens


def _routed_peers(n: int, experts: int, chosen: int) -> float:
    """Mean number of other ranks of an EP group of n holding one of a token's experts."""
    per_rank = experts // n
    miss = math.comb(experts - per_rank, chosen) / math.comb(experts, chosen)
    return (n - 1) * (1 - miss)


def _worst_group(layout: Layout, cluster: ClusterSpec, kind: str) -> list[int]:
    """The group of `kind` spanning the most nodes (the slowest one sets the pace)."""
    groups = layout.grid.groups(kind)
    return max(groups, key=lambda g: len({cluster.node_of(r) for r in g}))


def _pp_pair(layout: Layout, cluster: ClusterSpec) -> list[int]:
    """The pair of consecutive stages' ranks whose send crosses nodes, if any does."""
    grid = layout.grid
    pairs = [[grid.rank_of(pp=s), grid.rank_of(pp=s + 1)] for s in range(layout.pp - 1)]
    return max(pairs, key=lambda p: cluster.node_of(p[0]) != cluster.node_of(p[1]))


def step_cost(model: ModelSpec, layout: Layout, cluster: ClusterSpec, sequences: float,
              tokens_per_seq: float, context: float, sampled: float) -> StepCost:
    """One step of the busiest stage on one of its ranks: `sequences` sequences of a
    microbatch, each adding `tokens_per_seq` tokens after `context` cached ones,
    `sampled` of them sampling a token at the end."""
    dense, moe = max(_stage_layers(model, layout), key=lambda s: s[0] + s[1])
    tokens = sequences * tokens_per_seq / layout.sp
    dt, h = model.dtype_bytes, model.hidden
    heads = model.heads / (layout.tp * layout.sp)
    kv_heads = _kv_heads_per_rank(model, layout.tp * layout.sp)
    attn_flops = 4 * sequences * tokens_per_seq * (context + tokens_per_seq / 2) * heads * (
        model.head_dim)
    dense_w = _layer_weights(model, layout, False)
    flops = 2 * tokens * dense_w * dense + attn_flops * (dense + moe)
    weight_bytes = dense_w * dense * dt
    if moe:
        other_w = _layer_weights(model, layout, True) - (
            model.num_experts * model.expert_params() / (layout.ep if layout.expert_parallel
                                                         else layout.tp))
        flops += moe * 2 * tokens * (other_w + model.experts_per_token
                                     * model.expert_params() / layout.tp)
        seen = tokens * (layout.dp * layout.sp if layout.expert_parallel else 1)
        local = model.num_experts / layout.ep
        per_expert = model.expert_params() / (1 if layout.expert_parallel else layout.tp)
        touched = _experts_touched(model.num_experts, model.experts_per_token, seen)
        weight_bytes += moe * (other_w + local * touched * per_expert) * dt
    head = 2 * sampled * model.vocab * h / layout.tp
    kv_bytes = 2 * (dense + moe) * kv_heads * model.head_dim * dt * sequences * (
        context + tokens_per_seq)
    device = cluster.device
    ranks = min(cluster.devices_per_node, layout.world_size)
    rate, bandwidth, attention_bandwidth = device.rank_rates(ranks)
    read = weight_bytes + model.vocab * h / layout.tp * dt
    attention = 0.0
    if attention_bandwidth:
        attention = kv_bytes / attention_bandwidth
    else:
        read += kv_bytes
    compute = max((flops + head) / rate, read / bandwidth) + attention
    host = device.host_slowdown(ranks) * (
        device.step_host_s + device.step_host_per_seq_s * sequences
        + (dense + moe) * (device.layer_host_s + device.layer_host_per_seq_s * sequences))
    comm = _step_comm(model, layout, cluster, tokens, sampled, dense, moe)
    if wait := comm.calls * device.collective_wait_s(ranks):
        comm += CommCost(time_s=wait, intranode_time_s=wait)
    return StepCost(compute, read / bandwidth > (flops + head) / rate, comm, host)


def _step_comm(model: ModelSpec, layout: Layout, cluster: ClusterSpec, tokens: float,
               sampled: float, dense: int, moe: int) -> CommCost:
    """The collectives of one step of the busiest stage, on one rank."""
    row = model.hidden * model.dtype_bytes
    total = CommCost()
    if layout.tp > 1:
        tp = _worst_group(layout, cluster, "tp")
        reduces = 2 * dense + moe * (1 if layout.expert_parallel else 2) + 1
        total += collective_cost("all_reduce", tp, tokens * row, cluster).scaled(reduces)
        total += collective_cost("all_gather", tp, sampled * model.vocab / layout.tp
                                 * ACTIVATION_BYTES, cluster)
    if layout.sp > 1:
        sp = _worst_group(layout, cluster, "sp")
        heads = 2 * model.heads + 2 * max(model.kv_heads, layout.tp)
        width = heads * model.head_dim / layout.tp * model.dtype_bytes
        sent = tokens * width * (layout.sp - 1) / layout.sp
        total += collective_cost("all_to_all", sp, sent, cluster).scaled(dense + moe)
        total += collective_cost("all_gather", sp, tokens * row, cluster)
    if layout.pp > 1:
        total += collective_cost("send", _pp_pair(layout, cluster), 2 * tokens * row, cluster)
    if moe and layout.expert_parallel and layout.ep > 1:
        ep = _worst_group(layout, cluster, "ep")
        share = tokens / layout.tp
        peers = _routed_peers(layout.ep, model.num_experts, model.experts_per_token)
        total += collective_cost("all_to_all", ep, 2 * peers * share * row, cluster).scaled(moe)
        if layout.tp > 1:
            tp = _worst_group(layout, cluster, "tp")
            total += collective_cost("all_gather", tp, share * row, cluster).scaled(moe)
    return total

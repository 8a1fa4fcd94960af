"""Predicted throughput and latency of each valid layout, their ranking, and one line
that says why the first one wins."""

from __future__ import annotations

import math
from dataclasses import dataclass

from shardline.planner.cluster import ClusterSpec
from shardline.planner.collectives import CommCost
from shardline.planner.cost import Layout, Memory, StepCost, Workload, memory, step_cost
from shardline.planner.layouts import Rejected, enumerate_layouts
from shardline.planner.model_spec import ModelSpec

OBJECTIVES = ("throughput", "latency")


@dataclass(frozen=True)
class Estimate:
    """A layout's predicted performance on the workload.

    `concurrency` is the sequences a replica runs at once (the batch share, or fewer
    when its KV cache cannot hold them all); `decode` is one decode step of the busiest
    stage (one pipeline interval), `tpot_s` the time between a sequence's tokens,
    `ttft_s` the time until the last prompt of a wave has its first token: the prompts
    go through in chunks of the token budget, at least PP of them so that every stage
    works (the engine keeps PP steps in flight), `prefill` being one chunk's stage step.
    """

    layout: Layout
    memory: Memory
    concurrency: int
    decode: StepCost
    prefill: StepCost
    ttft_s: float
    tpot_s: float
    throughput: float
    latency_s: float

    @property
    def comm(self) -> CommCost:
        return self.decode.comm


@dataclass(frozen=True)
class Plan:
    model: ModelSpec
    cluster: ClusterSpec
    workload: Workload
    objective: str
    ranked: list[Estimate]
    rejected: list[Rejected]
    explanation: str


def estimate(model: ModelSpec, layout: Layout, cluster: ClusterSpec,
             workload: Workload) -> Estimate:
    """Prefill, then output_len decode steps, for one wave of each replica's requests."""
    mem = memory(model, layout, cluster, workload)
    prompt, output = workload.prompt_len, workload.output_len
    share = math.ceil(workload.batch / layout.dp)
    concurrency = max(1, min(share, mem.kv_capacity_tokens // (prompt + output)))
    micro = concurrency / layout.pp
    decode = step_cost(model, layout, cluster, micro, 1, prompt + output / 2, micro)
    tpot = layout.pp * decode.time_s
    prompt_tokens = concurrency * prompt
    chunks = max(layout.pp, math.ceil(prompt_tokens / workload.max_num_batched_tokens))
    chunk = prompt_tokens / chunks
    prefill = step_cost(model, layout, cluster, chunk / prompt, prompt, 0, chunk / prompt)
    ttft = (chunks + layout.pp - 1) * prefill.time_s
    wave = ttft + output * tpot
    served = min(workload.batch, layout.dp * concurrency)
    return Estimate(layout, mem, concurrency, decode, prefill, ttft, tpot,
                    served * output / wave, wave)


def _sort_key(objective: str):
    if objective == "latency":
        return lambda e: (e.latency_s, -e.throughput, e.layout.world_size)
    return lambda e: (-e.throughput, e.latency_s, e.layout.pp, e.layout.name)


def plan(model: ModelSpec, cluster: ClusterSpec, workload: Workload,
         objective: str = "throughput") -> Plan:
    """Every valid layout of `model` over all of `cluster`'s devices, best first."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective={objective!r} is invalid: use one of {OBJECTIVES}")
    valid, rejected = enumerate_layouts(model, cluster, workload)
    if not valid:
        fits = [r for r in rejected if r.reason.startswith("does not fit")]
        closest = min(fits or rejected, key=lambda r: memory(model, r.layout, cluster,
                                                             workload).weights_bytes)
        raise ValueError(f"no layout of {model.name} fits {cluster.world_size} devices of "
                         f"{cluster.device.memory_bytes / 1e9:.0f} GB: the closest, "
                         f"{closest.layout.name}, {closest.reason}; add devices or memory, "
                         "or use a smaller --dtype")
    ranked = sorted((estimate(model, layout, cluster, workload) for layout in valid),
                    key=_sort_key(objective))
    return Plan(model, cluster, workload, objective, ranked, rejected,
                explain(ranked, cluster, objective))


def _spans_nodes(layout: Layout, cluster: ClusterSpec, kind: str) -> bool:
    return any(len({cluster.node_of(r) for r in group}) > 1
               for group in layout.grid.groups(kind))


def _placement(layout: Layout, cluster: ClusterSpec) -> str:
    parts = []
    for kind, size in (("tp", layout.tp), ("sp", layout.sp), ("pp", layout.pp),
                       ("dp", layout.dp)):
        if size > 1:
            where = "across nodes" if _spans_nodes(layout, cluster, kind) else (
                "inside each node" if cluster.nodes > 1 else "")
            parts.append(f"{kind.upper()}={size} {where}".strip())
    if layout.expert_parallel:
        parts.append(f"EP={layout.ep} (whole experts per rank)")
    return ", ".join(parts) or "one device"


def _reason(best: Estimate, cluster: ClusterSpec) -> str:
    """What makes the pick cheap: where its traffic runs, or what bounds its step."""
    layout = best.layout
    crossing = [k.upper() for k in ("tp", "sp", "pp", "ep")
                if getattr(layout, k) > 1 and _spans_nodes(layout, cluster, k)]
    intra = cluster.intranode.name
    if layout.tp > 1 and cluster.nodes > 1 and "TP" not in crossing:
        rest = f"only {'/'.join(crossing)} traffic crosses nodes" if crossing else (
            "nothing crosses nodes")
        return f"TP traffic stays on {intra}, {rest}"
    if layout.world_size == 1:
        return "one device holds the model, no communication"
    if layout.expert_parallel and not crossing:
        return (f"the experts spread over {layout.ep} devices of one node, their all-to-all "
                f"stays on {intra}")
    if layout.dp > 1 and not crossing:
        per_replica = layout.world_size // layout.dp
        holders = "one device holds" if per_replica == 1 else f"{per_replica} devices hold"
        return f"in each replica {holders} the model, the replicas exchange nothing"
    comm = best.decode.comm.time_s / best.decode.time_s
    bound = "memory" if best.decode.memory_bound else "compute"
    return f"decode is {bound}-bound, communication {comm:.0%} of a step"


def explain(ranked: list[Estimate], cluster: ClusterSpec, objective: str) -> str:
    """One line: where the pick puts each dimension, why, and by how much it wins."""
    best = ranked[0]
    line = f"{_placement(best.layout, cluster)}: {_reason(best, cluster)}"
    if len(ranked) > 1:
        other = ranked[1]
        if objective == "latency":
            line += (f"; {other.latency_s / best.latency_s:.2f}x faster per request than "
                     f"{other.layout.name}")
        else:
            line += (f"; {best.throughput / other.throughput:.2f}x the throughput of "
                     f"{other.layout.name}")
    return line

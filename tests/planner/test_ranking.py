"""Ranking sanity: the order follows the objective, and topology drives the pick."""

import pytest

from shardline.planner.cluster import Link, gpu_cluster, with_overrides
from shardline.planner.cost import Workload
from shardline.planner.model_spec import load_spec
from shardline.planner.ranking import plan

WORKLOAD = Workload(batch=64, prompt_len=1024, output_len=256)


def _tp_inside_nodes(layout, cluster) -> bool:
    return all(len({cluster.node_of(r) for r in group}) == 1
               for group in layout.grid.groups("tp"))


def test_slow_internode_keeps_tp_inside_a_node():
    slow = with_overrides(gpu_cluster("h100", 2, 8), internode=Link(50e-6, 1e9, "ethernet"))
    result = plan(load_spec("llama-3-70b"), slow, WORKLOAD)
    best = result.ranked[0].layout
    assert best.tp > 1 and _tp_inside_nodes(best, slow)
    assert "TP traffic stays on NVLink" in result.explanation
    crossing = [e for e in result.ranked if not _tp_inside_nodes(e.layout, slow)]
    assert crossing and all(e.throughput < result.ranked[0].throughput / 2 for e in crossing)
    assert result.ranked[0].comm.internode_time_s < result.ranked[0].decode.time_s / 10


def test_ranked_by_the_objective():
    model, c = load_spec("llama-3-8b"), gpu_cluster("h100", 1, 8)
    by_throughput = plan(model, c, WORKLOAD).ranked
    throughputs = [e.throughput for e in by_throughput]
    assert throughputs == sorted(throughputs, reverse=True)
    by_latency = plan(model, c, WORKLOAD, objective="latency").ranked
    latencies = [e.latency_s for e in by_latency]
    assert latencies == sorted(latencies)
    assert {e.layout for e in by_latency} == {e.layout for e in by_throughput}
    with pytest.raises(ValueError, match="objective='cost'"):
        plan(model, c, WORKLOAD, objective="cost")


def test_small_model_with_many_requests_prefers_replicas():
    result = plan(load_spec("llama-3-8b"), gpu_cluster("h100", 1, 8),
                  Workload(batch=512, prompt_len=512, output_len=128))
    assert result.ranked[0].layout.dp >= 2
    assert "replica" in result.explanation


def test_memory_limits_concurrency():
    big = Workload(batch=4096, prompt_len=4096, output_len=1024)
    result = plan(load_spec("llama-3-70b"), gpu_cluster("h100", 1, 8), big)
    for e in result.ranked:
        per_replica = -(-big.batch // e.layout.dp)
        assert e.concurrency <= per_replica
        assert e.concurrency * (big.prompt_len + big.output_len) <= max(
            e.memory.kv_capacity_tokens, big.prompt_len + big.output_len)


def test_no_fitting_layout_names_the_closest():
    with pytest.raises(ValueError, match="no layout of llama-3-70b fits 2 devices of 80 GB: "
                                         "the closest"):
        plan(load_spec("llama-3-70b"), gpu_cluster("h100", 1, 2), WORKLOAD)

"""Layout enumeration: every candidate is a factorization of the cluster, and a layout
that shardline's partition rules refuse is never listed."""

import random

import pytest

from shardline.planner.cluster import gpu_cluster
from shardline.planner.cost import Layout, Workload
from shardline.planner.layouts import candidates, enumerate_layouts, partition_error
from shardline.planner.model_spec import ModelSpec, load_spec

WORKLOAD = Workload(batch=8, prompt_len=128, output_len=32)


def _random_model(rng: random.Random, experts: int = 0) -> ModelSpec:
    kv = rng.choice([1, 2, 3, 4, 8])
    heads = kv * rng.choice([1, 2, 3, 4])
    layers = rng.randint(1, 12)
    return ModelSpec(name="random", num_layers=layers, hidden=64 * heads,
                     heads=heads, kv_heads=kv, head_dim=64, intermediate=256,
                     vocab=1000, num_experts=experts, experts_per_token=2 if experts else 0,
                     moe_intermediate=128, moe_layers=layers if experts else 0, dtype_bytes=2)


def _follows_the_rules(model: ModelSpec, layout: Layout) -> bool:
    """The design's partition rules, restated: heads and KV heads over TP x SP (KV heads
    replicated past their count), at least one layer per stage, experts split evenly
    over the EP group."""
    split = layout.tp * layout.sp
    return (model.heads % split == 0
            and (model.kv_heads % split == 0 or split % model.kv_heads == 0)
            and layout.pp <= model.num_layers
            and (not layout.expert_parallel or model.num_experts % layout.ep == 0))


@pytest.mark.parametrize("world", [1, 2, 4, 6, 8, 12, 16])
def test_candidates_are_every_factorization_once(world):
    layouts = candidates(world, moe=True)
    assert all(layout.world_size == world for layout in layouts)
    assert len(set(layouts)) == len(layouts)
    dense = candidates(world, moe=False)
    assert not any(layout.expert_parallel for layout in dense)
    factorizations = {(tp, pp, sp, world // (tp * pp * sp)) for tp in range(1, world + 1)
                      for pp in range(1, world + 1) for sp in range(1, world + 1)
                      if world % (tp * pp * sp) == 0}
    assert {(x.tp, x.pp, x.sp, x.dp) for x in dense} == factorizations


def test_listed_layouts_respect_the_partition_rules(fresh_seed):
    rng = random.Random(fresh_seed)
    for _ in range(20):
        model = _random_model(rng, experts=rng.choice([0, 4, 6, 8]))
        cluster = gpu_cluster("h100", rng.choice([1, 2]), rng.choice([2, 3, 4, 6, 8]))
        valid, rejected = enumerate_layouts(model, cluster, WORKLOAD)
        for layout in valid:
            assert _follows_the_rules(model, layout), (model, layout)
        for entry in rejected:
            assert entry.reason
            if _follows_the_rules(model, entry.layout):
                assert entry.reason.startswith("does not fit"), entry
        assert len(valid) + len(rejected) == len(candidates(cluster.world_size,
                                                            model.num_experts > 0))


def test_smollm2_heads_refuse_tp2_and_take_tp3():
    model = ModelSpec(name="smollm2", num_layers=30, hidden=576, heads=9, kv_heads=3,
                      head_dim=64, intermediate=1536, vocab=49152, dtype_bytes=2)
    valid, rejected = enumerate_layouts(model, gpu_cluster("h100", 1, 6), WORKLOAD)
    names = {layout.name for layout in valid}
    assert {"PP2xTP3", "DP2xTP3", "DP2xSP3"} <= names
    assert all(layout.tp * layout.sp in (1, 3) for layout in valid)
    refused = {r.layout.name: r.reason for r in rejected}
    assert "tensor_parallel_size=2" in refused["DP3xTP2"]
    assert "9 attention heads" in refused["SP2xTP3"]


def test_expert_parallel_needs_the_experts_to_split_evenly():
    model = load_spec("tiny-mixtral")
    assert model.num_experts == 4
    valid, rejected = enumerate_layouts(model, gpu_cluster("h100", 1, 8), WORKLOAD)
    ep_sizes = {layout.ep for layout in valid if layout.expert_parallel}
    assert ep_sizes and ep_sizes <= {2, 4}
    assert any("8 ranks" in r.reason for r in rejected if r.layout.expert_parallel)


def test_layouts_that_do_not_fit_are_refused_with_sizes():
    model = load_spec("llama-3-70b")
    valid, rejected = enumerate_layouts(model, gpu_cluster("h100", 1, 8), WORKLOAD)
    refused = {r.layout.name: r.reason for r in rejected}
    assert "DP8" in refused and "141.1 GB of weights" in refused["DP8"]
    assert all(layout.tp * layout.pp >= 2 for layout in valid)


def test_partition_error_names_the_rule():
    model = load_spec("small-llama")
    assert partition_error(model, Layout(tp=2)) is None
    assert "pipeline_parallel_size=16" in partition_error(model, Layout(pp=16))
    assert "attention heads" in partition_error(model, Layout(tp=16))

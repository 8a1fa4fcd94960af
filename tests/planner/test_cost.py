"""The cost model's formulas against hand-computed cases."""

import math
from dataclasses import replace

import pytest

from shardline.planner.cluster import ClusterSpec, DeviceSpec, Link, gpu_cluster
from shardline.planner.collectives import collective_cost, ring_all_reduce
from shardline.planner.cost import Layout, Workload, _routed_peers, memory, step_cost
from shardline.planner.model_spec import ModelSpec, load_spec

MODEL = ModelSpec(name="hand", num_layers=4, hidden=64, heads=4, kv_heads=2, head_dim=16,
                  intermediate=128, vocab=100, dtype_bytes=2)
INTRA = Link(2e-6, 100e9, "fast")
INTER = Link(20e-6, 10e9, "slow")


def cluster(nodes: int, per_node: int, memory_bytes: float = 1e9) -> ClusterSpec:
    device = DeviceSpec("test", memory_bytes, flops=1e12, memory_bandwidth=1e11)
    return ClusterSpec(nodes, per_node, device, INTRA, INTER)


def test_weights_and_kv_per_device_by_hand():
    workload = Workload(batch=1, prompt_len=8, output_len=8, max_num_batched_tokens=16,
                        gpu_memory_utilization=1.0)
    # TP2 x PP2: per layer q+o 2*64*32, k+v 2*64*16 (one KV head), norms 2*64, MLP
    # 3*64*128/2; two layers and half the embedding (or LM head) per stage.
    per_layer = 2 * 64 * 32 + 2 * 64 * 16 + 2 * 64 + 3 * 64 * 128 // 2
    mem = memory(MODEL, Layout(tp=2, pp=2), cluster(1, 4), workload)
    assert mem.weights_bytes == (2 * per_layer + 100 * 64 // 2) * 2
    assert mem.kv_bytes_per_token == 2 * 2 * 1 * 16 * 2
    # TP4 exceeds the 2 KV heads: each rank keeps one, replicated.
    per_layer = 2 * 64 * 16 + 2 * 64 * 16 + 2 * 64 + 3 * 64 * 128 // 4
    mem = memory(MODEL, Layout(tp=4), cluster(1, 4), workload)
    assert mem.weights_bytes == (4 * per_layer + 2 * 100 * 64 // 4) * 2
    assert mem.kv_bytes_per_token == 2 * 4 * 1 * 16 * 2
    free = 1e9 - mem.weights_bytes - mem.activation_bytes
    assert mem.kv_capacity_tokens == int(free // mem.kv_bytes_per_token)


def test_tied_embeddings_are_held_once_without_pipeline_stages():
    workload = Workload(batch=1, prompt_len=8, output_len=8)
    tied = load_spec("tiny-llama3")
    untied = load_spec("tiny-llama")
    assert tied.tie_embeddings and not untied.tie_embeddings
    gap = (memory(untied, Layout(), cluster(1, 1), workload).weights_bytes
           - memory(tied, Layout(), cluster(1, 1), workload).weights_bytes)
    assert gap == 320 * 128 * 4
    assert tied.total_params() == untied.total_params() - 320 * 128


def test_tp_step_traffic_by_hand():
    step = step_cost(MODEL, Layout(tp=2), cluster(1, 2), sequences=8, tokens_per_seq=1,
                     context=16, sampled=8)
    # 2 all-reduces per layer and one after the embedding, of 8 rows of 64 bf16; the
    # logits gather sends this rank's 8 x 50 fp32 half to the other rank.
    reduce_bytes, gather_bytes = 8 * 64 * 2, 8 * 50 * 4
    assert step.comm.intranode_bytes == 9 * reduce_bytes + gather_bytes
    assert step.comm.internode_bytes == 0
    expected = 9 * (2 * INTRA.latency_s + reduce_bytes / INTRA.bandwidth) + (
        INTRA.latency_s + gather_bytes / INTRA.bandwidth)
    assert step.comm.time_s == pytest.approx(expected)


def test_sequence_parallel_traffic_by_hand():
    step = step_cost(MODEL, Layout(sp=2), cluster(1, 2), sequences=8, tokens_per_seq=1,
                     context=16, sampled=8)
    # Each rank holds 4 of the 8 tokens; per layer it sends the other rank half of its
    # Q, K, V (4 + 2 + 2 heads of 16 bf16) and half of the attention output (4 heads);
    # at the end it sends its 4 rows of hidden state to be gathered.
    per_layer = 4 * (4 + 2 + 2 + 4) * 16 * 2 // 2
    assert step.comm.intranode_bytes == 4 * per_layer + 4 * 64 * 2
    assert step.comm.internode_bytes == 0


def test_pipeline_send_across_nodes_is_internode():
    step = step_cost(MODEL, Layout(pp=2), cluster(2, 1), sequences=8, tokens_per_seq=1,
                     context=16, sampled=8)
    sent = 2 * 8 * 64 * 2  # hidden state and residual
    assert (step.comm.intranode_bytes, step.comm.internode_bytes) == (0, sent)
    assert step.comm.time_s == pytest.approx(INTER.latency_s + sent / INTER.bandwidth)
    inside = step_cost(MODEL, Layout(pp=2), cluster(1, 2), 8, 1, 16, 8)
    assert (inside.comm.intranode_bytes, inside.comm.internode_bytes) == (sent, 0)


def test_collective_formulas(fresh_seed):
    import random

    rng = random.Random(fresh_seed)
    nbytes = rng.randrange(1, 1 << 24)
    c = cluster(2, 2)
    assert ring_all_reduce(4, nbytes, INTRA) == pytest.approx(
        6 * INTRA.latency_s + 1.5 * nbytes / INTRA.bandwidth)
    inside = collective_cost("all_reduce", [0, 1], nbytes, c)
    assert inside.time_s == pytest.approx(2 * INTRA.latency_s + nbytes / INTRA.bandwidth)
    gather = collective_cost("all_gather", [0, 1, 2, 3], nbytes, c)
    assert gather.time_s == pytest.approx(3 * (INTER.latency_s + nbytes / INTER.bandwidth))
    assert gather.intranode_bytes + gather.internode_bytes == pytest.approx(3 * nbytes)
    scatter = collective_cost("reduce_scatter", [0, 1], nbytes, c)
    assert scatter.time_s == pytest.approx(INTRA.latency_s + nbytes / 2 / INTRA.bandwidth)
    # rank 0 of [0, 1, 2, 3] on two nodes: one peer beside it, two across.
    a2a = collective_cost("all_to_all", [0, 1, 2, 3], 3 * nbytes, c)
    assert a2a.intranode_bytes == pytest.approx(nbytes)
    assert a2a.internode_bytes == pytest.approx(2 * nbytes)
    assert a2a.time_s == pytest.approx(3 * INTER.latency_s + 2 * nbytes / INTER.bandwidth)
    with pytest.raises(ValueError, match="broadcast"):
        collective_cost("broadcast", [0, 1], nbytes, c)


def test_tree_all_reduce_wins_for_small_messages_on_many_ranks():
    c = cluster(1, 64)
    small = collective_cost("all_reduce", list(range(64)), 64, c)
    assert small.time_s == pytest.approx(2 * 6 * INTRA.latency_s + 2 * 64 / INTRA.bandwidth)
    large = collective_cost("all_reduce", list(range(64)), 1 << 30, c)
    assert large.time_s == pytest.approx(ring_all_reduce(64, 1 << 30, INTRA))


@pytest.mark.parametrize("ranks,experts,chosen,peers", [(8, 8, 2, 1.75), (2, 4, 2, 5 / 6),
                                                        (4, 4, 2, 1.5)])
def test_routed_peers_match_the_expert_parallel_notes(ranks, experts, chosen, peers):
    assert _routed_peers(ranks, experts, chosen) == pytest.approx(peers)


def test_decode_of_a_large_model_is_memory_bound_and_prefill_compute_bound():
    model = load_spec("llama-3-70b")
    c = gpu_cluster("h100", 1, 8)
    decode = step_cost(model, Layout(tp=8), c, 16, 1, 1024, 16)
    prefill = step_cost(model, Layout(tp=8), c, 2, 1024, 0, 2)
    assert decode.memory_bound and not prefill.memory_bound
    weights = memory(model, Layout(tp=8), c, Workload(1, 8, 8)).weights_bytes
    assert decode.compute_s >= weights / c.device.memory_bandwidth
    assert math.isclose(model.total_params() / 1e9, 70.55, abs_tol=0.01)


def test_cpu_ranks_share_the_cores():
    cpu = DeviceSpec("CPU", 8e9, flops=30e9, memory_bandwidth=8e9, shared_by_ranks=True,
                     cores=2, flops_per_core=20e9, attention_bandwidth=2e9)
    assert cpu.rank_rates(1) == (30e9, 8e9, 2e9)
    assert cpu.rank_rates(2) == (20e9, 4e9, 1e9)
    assert cpu.rank_rates(4) == (10e9, 2e9, 0.5e9)
    assert [cpu.host_slowdown(n) for n in (1, 2, 4)] == [1, 1, 2]
    # With a measured single-threaded bandwidth, ranks stream at it, as they compute.
    streams = replace(cpu, bandwidth_per_core=6e9)
    assert streams.rank_rates(2) == (20e9, 6e9, 1.5e9)
    assert streams.rank_rates(4) == (10e9, 3e9, 0.75e9)
    gpu = DeviceSpec("GPU", 8e9, flops=30e9, memory_bandwidth=8e9)
    assert gpu.rank_rates(8) == (30e9, 8e9, 0.0)
    assert gpu.host_slowdown(8) == 1


def test_pipeline_prefill_runs_at_least_one_chunk_per_stage():
    from shardline.planner.ranking import estimate

    workload = Workload(batch=4, prompt_len=64, output_len=8)
    e = estimate(MODEL, Layout(pp=2), cluster(1, 2), workload)
    assert e.ttft_s == pytest.approx(3 * e.prefill.time_s)
    one = estimate(MODEL, Layout(), cluster(1, 1), workload)
    assert one.ttft_s == pytest.approx(one.prefill.time_s)


def test_host_time_and_cpu_attention_by_hand():
    cpu = DeviceSpec("CPU", 1e9, flops=1e12, memory_bandwidth=1e11, shared_by_ranks=True,
                     cores=2, flops_per_core=4e11, bandwidth_per_core=4e10,
                     attention_bandwidth=1e10, step_host_s=1e-3, step_host_per_seq_s=1e-5,
                     layer_host_s=2e-4, layer_host_per_seq_s=3e-6)
    two = ClusterSpec(1, 2, cpu, INTRA, INTER)
    step = step_cost(MODEL, Layout(pp=2), two, sequences=8, tokens_per_seq=1, context=16,
                     sampled=8)
    # A stage of 2 layers; 2 ranks on 2 cores: one core each, host time as measured.
    assert step.host_s == pytest.approx(1e-3 + 8 * 1e-5 + 2 * (2e-4 + 8 * 3e-6))
    # Weights (2 layers and the LM head) stream at the per-core rate, 4e10 B/s; the KV
    # cache (2 layers x 2 heads x 16 x 2 bytes x K and V, 8 sequences of 17 tokens)
    # at the attention's rate scaled as the rank's bandwidth: 1e10 x 4e10 / 1e11.
    layer = 64 * (2 * 64 + 2 * 32) + 2 * 64 + 3 * 64 * 128
    weights = (2 * layer + 100 * 64) * 2
    kv = 2 * 2 * 2 * 16 * 2 * 8 * 17
    assert step.memory_bound
    assert step.compute_s == pytest.approx(weights / 4e10 + kv / 4e9)
    assert step.time_s == pytest.approx(step.compute_s + step.host_s + step.comm.time_s)
    # TP4 on 2 cores: every rank runs all 4 layers, at half a core.
    four = ClusterSpec(1, 4, cpu, INTRA, INTER)
    tp4 = step_cost(MODEL, Layout(tp=4), four, 8, 1, 16, 8)
    assert tp4.host_s == pytest.approx(2 * (1e-3 + 8 * 1e-5 + 4 * (2e-4 + 8 * 3e-6)))


def test_ranks_beyond_the_cores_wait_at_every_collective(rng):
    wait = rng.uniform(1e-4, 2e-3)
    cpu = DeviceSpec("CPU", 1e9, flops=1e12, memory_bandwidth=1e11, shared_by_ranks=True,
                     cores=2, shared_core_collective_s=wait)
    tp2 = step_cost(MODEL, Layout(tp=2), ClusterSpec(1, 2, cpu, INTRA, INTER), 8, 1, 16, 8)
    # Two ranks on two cores: the links' time only; 4 layers x 2 all-reduces, one after
    # the embedding and the logits' all-gather.
    assert tp2.comm.calls == 2 * 4 + 1 + 1
    assert tp2.comm == step_cost(MODEL, Layout(tp=2), ClusterSpec(
        1, 2, replace(cpu, shared_core_collective_s=0.0), INTRA, INTER), 8, 1, 16, 8).comm
    four = ClusterSpec(1, 4, cpu, INTRA, INTER)
    tp4 = step_cost(MODEL, Layout(tp=4), four, 8, 1, 16, 8)
    links = step_cost(MODEL, Layout(tp=4), ClusterSpec(
        1, 4, replace(cpu, shared_core_collective_s=0.0), INTRA, INTER), 8, 1, 16, 8)
    assert tp4.comm.calls == 10
    assert tp4.comm.time_s == pytest.approx(links.comm.time_s + 10 * wait)
    assert tp4.comm.intranode_time_s == pytest.approx(links.comm.intranode_time_s + 10 * wait)
    # PP2 x TP2 on 2 cores: a stage's 2 layers, and the busiest stage is charged the
    # embedding's all-reduce, the logits' all-gather and the send.
    pp = step_cost(MODEL, Layout(tp=2, pp=2), four, 8, 1, 16, 8)
    assert pp.comm.calls == 2 * 2 + 1 + 1 + 1
    # A GPU's ranks never share.
    gpu = replace(cpu, shared_by_ranks=False)
    assert step_cost(MODEL, Layout(tp=4), ClusterSpec(1, 4, gpu, INTRA, INTER), 8, 1, 16,
                     8).comm.time_s == pytest.approx(links.comm.time_s)


def test_gpu_defaults_charge_little_host_time_and_read_the_kv_cache_from_hbm():
    model = load_spec("llama-3-70b")
    h100 = gpu_cluster("h100", 1, 8)
    assert h100.device.attention_bandwidth == 0
    step = step_cost(model, Layout(tp=8), h100, 64, 1, 1024, 64)
    # 80 layers of 14 kernels at 4 us, the engine's Python for a step of 64 sequences
    # and 12 kernels around the layers: less than the step's weight and KV reads.
    assert step.host_s == pytest.approx(80 * 14 * 4e-6 + 208e-6 + 12 * 4e-6 + 64 * 18e-6)
    assert step.host_s < step.compute_s

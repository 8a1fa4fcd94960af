import pytest
import torch

from shardline.distributed import parallel_state
from shardline.distributed.parallel_state import GroupCoordinate
from shardline.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from shardline.layers.linear import (ColumnParallelLinear, MergedColumnParallelLinear,
                                     QKVParallelLinear, RowParallelLinear)


@pytest.fixture
def tp_rank(monkeypatch):
    """Pretend to be one rank of a tensor-parallel group (weights only, no collectives)."""
    def set_rank(rank: int, size: int) -> None:
        monkeypatch.setattr(parallel_state, "_tp", GroupCoordinate(rank, size))
    return set_rank


@pytest.mark.parametrize("tp,kv_heads", [(2, 2), (2, 4), (4, 2), (8, 2)])
def test_qkv_loader_takes_this_ranks_heads(tp_rank, tp, kv_heads):
    """Each rank takes its query heads; KV heads are split when TP divides them, else
    replicated: rank r holds KV head r // (tp / kv_heads), as its query heads need."""
    heads, dim, hidden = 8, 3, 5
    q, k, v = (torch.randn(n * dim, hidden) for n in (heads, kv_heads, kv_heads))
    replicas = max(1, tp // kv_heads)
    for rank in range(tp):
        tp_rank(rank, tp)
        layer = QKVParallelLinear(hidden, dim, heads, kv_heads)
        assert layer.num_kv_heads == max(1, kv_heads // tp)
        for name, w in zip("qkv", (q, k, v)):
            layer.weight_loader(layer.weight, w, f"{name}_proj.weight", name)
        kv_part = rank // replicas
        q_part = q.chunk(tp)[rank]
        k_part, v_part = k.chunk(tp // replicas)[kv_part], v.chunk(tp // replicas)[kv_part]
        assert torch.equal(layer.weight, torch.cat([q_part, k_part, v_part]))


def test_merged_and_row_loaders_split_by_rank(tp_rank):
    gate, up, down = torch.randn(8, 6), torch.randn(8, 6), torch.randn(6, 8)
    for rank in range(2):
        tp_rank(rank, 2)
        merged = MergedColumnParallelLinear(6, [8, 8])
        merged.weight_loader(merged.weight, gate, "gate_proj.weight", 0)
        merged.weight_loader(merged.weight, up, "up_proj.weight", 1)
        assert torch.equal(merged.weight, torch.cat([gate.chunk(2)[rank], up.chunk(2)[rank]]))
        row = RowParallelLinear(8, 6)
        row.weight_loader(row.weight, down, "down_proj.weight")
        assert torch.equal(row.weight, down.chunk(2, dim=1)[rank])


def test_single_rank_linear_computes_x_wt_plus_b():
    layer = ColumnParallelLinear(4, 3, bias=True)
    w, b = torch.randn(3, 4), torch.randn(3)
    layer.weight_loader(layer.weight, w, "w")
    layer.weight_loader(layer.bias, b, "b")
    x = torch.randn(5, 4)
    torch.testing.assert_close(layer(x), x @ w.T + b)


def test_vocab_partition_pads_last_rank(tp_rank):
    table = torch.randn(7, 4)
    tp_rank(1, 2)
    emb = VocabParallelEmbedding(7, 4)
    emb.weight_loader(emb.weight, table, "embed_tokens.weight")
    assert torch.equal(emb.weight[:3], table[4:])
    assert torch.count_nonzero(emb.weight[3]) == 0


def test_lm_head_and_embedding_single_rank():
    table = torch.randn(11, 4)
    head = ParallelLMHead(11, 4)
    head.weight_loader(head.weight, table, "lm_head.weight")
    h = torch.randn(2, 4)
    torch.testing.assert_close(head(h), h @ table.T)
    emb = VocabParallelEmbedding(11, 4)
    emb.weight_loader(emb.weight, table, "embed_tokens.weight")
    assert torch.equal(emb(torch.tensor([3, 10])), table[[3, 10]])


def test_wrong_shape_names_tensor_and_shapes():
    layer = RowParallelLinear(8, 6)
    with pytest.raises(ValueError, match=r"'x\.down_proj\.weight' has shape \[6, 7\], "
                                         r"expected \[6, 8\]"):
        layer.weight_loader(layer.weight, torch.randn(6, 7), "x.down_proj.weight")


def _gate_up_reference(x, gate, up, gate_bias, up_bias):
    return torch.nn.functional.silu(x @ gate.T + gate_bias) * (x @ up.T + up_bias)


def test_silu_mul_applies_the_gate_up_bias_on_each_rank(tp_rank, fresh_seed):
    hidden, inter = 6, 8
    gate, up = torch.randn(inter, hidden), torch.randn(inter, hidden)
    gate_bias, up_bias = torch.randn(inter), torch.randn(inter)
    x = torch.randn(5, hidden)
    expected = _gate_up_reference(x, gate, up, gate_bias, up_bias)
    for rank in range(2):
        tp_rank(rank, 2)
        layer = MergedColumnParallelLinear(hidden, [inter, inter], bias=True)
        for shard, (w, b) in enumerate([(gate, gate_bias), (up, up_bias)]):
            layer.weight_loader(layer.weight, w, "w", shard)
            layer.weight_loader(layer.bias, b, "b", shard)
        torch.testing.assert_close(layer.silu_mul(x), expected.chunk(2, dim=1)[rank])


def test_silu_mul_refuses_a_layer_that_is_not_a_gate_up_pair():
    layer = MergedColumnParallelLinear(4, [3, 5])
    with pytest.raises(ValueError, match=r"two equal outputs.*output_sizes=\[3, 5\]"):
        layer.silu_mul(torch.randn(2, 4))


def test_llama_mlp_goes_through_its_layers_bias_included(fresh_seed):
    from shardline.models.llama import LlamaMLP

    hidden, inter = 6, 8
    mlp = LlamaMLP(hidden, inter, torch.float32, bias=True)
    gate, up = torch.randn(inter, hidden), torch.randn(inter, hidden)
    down = torch.randn(hidden, inter)
    gate_bias, up_bias, down_bias = torch.randn(inter), torch.randn(inter), torch.randn(hidden)
    for shard, (w, b) in enumerate([(gate, gate_bias), (up, up_bias)]):
        mlp.gate_up_proj.weight_loader(mlp.gate_up_proj.weight, w, "w", shard)
        mlp.gate_up_proj.weight_loader(mlp.gate_up_proj.bias, b, "b", shard)
    mlp.down_proj.weight_loader(mlp.down_proj.weight, down, "down")
    mlp.down_proj.weight_loader(mlp.down_proj.bias, down_bias, "down_bias")
    x = torch.randn(5, hidden)
    expected = _gate_up_reference(x, gate, up, gate_bias, up_bias) @ down.T + down_bias
    # An output is a sum of terms up to ~50 that may cancel to ~1: summed in another order it
    # moves by ~1e-5 (once in ~1000 seeds past assert_close's default atol of 1e-5).
    scale = expected.abs().max().item()
    torch.testing.assert_close(mlp(x), expected, rtol=1e-5, atol=1e-5 * scale)


def test_silu_mul_runs_the_fused_kernel_with_the_bias(monkeypatch, fresh_seed):
    """On CUDA the kernel itself; on the CPU the kernel forced into the Triton interpreter."""
    from shardline.kernels import dispatch, matmul

    calls = []
    fused = matmul.linear_silu_mul
    monkeypatch.setattr(matmul, "linear_silu_mul",
                        lambda *args: calls.append(args) or fused(*args))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        monkeypatch.setenv("SHARDLINE_FORCE_TRITON", "1")
        dispatch.reset_triton_choice()
    hidden, inter = 16, 16
    gate, up = torch.randn(inter, hidden), torch.randn(inter, hidden)
    gate_bias, up_bias = torch.randn(inter), torch.randn(inter)
    layer = MergedColumnParallelLinear(hidden, [inter, inter], bias=True)
    for shard, (w, b) in enumerate([(gate, gate_bias), (up, up_bias)]):
        layer.weight_loader(layer.weight, w, "w", shard)
        layer.weight_loader(layer.bias, b, "b", shard)
    layer.to(device)
    x = torch.randn(3, hidden)
    out = layer.silu_mul(x.to(device))
    assert len(calls) == 1 and calls[0][2] is layer.bias
    tolerance = 1e-4 if device == "cpu" else 2e-2   # tf32 products on the GPU
    torch.testing.assert_close(out.cpu(), _gate_up_reference(x, gate, up, gate_bias, up_bias),
                               rtol=tolerance, atol=tolerance)


def test_row_parallel_forward_and_norm_adds_the_residual_then_norms(fresh_seed):
    """On one rank: (RMSNorm(x W^T + b + residual), x W^T + b + residual)."""
    from shardline.layers.norm import RMSNorm

    layer, norm = RowParallelLinear(8, 6, bias=True), RMSNorm(6, eps=1e-5)
    w, b, g = torch.randn(6, 8), torch.randn(6), torch.randn(6)
    layer.weight_loader(layer.weight, w, "w")
    layer.weight_loader(layer.bias, b, "b")
    norm.weight_loader(norm.weight, g, "g")
    x, residual = torch.randn(5, 8), torch.randn(5, 6)
    normed, summed = layer.forward_and_norm(x, residual, norm)
    expected = x @ w.T + b + residual
    torch.testing.assert_close(summed, expected)
    rms = expected.pow(2).mean(-1, keepdim=True).add(1e-5).rsqrt()
    torch.testing.assert_close(normed, expected * rms * g)

"""The CPU's packed oneDNN GEMM (layers.cpu_gemm): it computes what F.linear does, every
linear layer of a model loaded on the CPU in fp32 takes it, and each layer's fused forms
(SiLU-mul, output projection + residual + norm, QKV + rotary + cache store) match their
kernel path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from shardline.layers import cpu_gemm
from shardline.layers.attention import Attention, AttentionMetadata
from shardline.layers.embedding import ParallelLMHead
from shardline.layers.linear import (LinearBase, MergedColumnParallelLinear, QKVParallelLinear,
                                     RowParallelLinear)
from shardline.layers.norm import RMSNorm
from shardline.layers.rotary import RotaryEmbedding
from shardline.models.loader import load_model
from shardline.presets import build_variant

pytestmark = pytest.mark.skipif(not cpu_gemm._onednn_ops(),
                                reason="this torch build has no oneDNN linear ops")


def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """fp32 products summed in another order: equal to a few ulps of their magnitude."""
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * expected.abs().max())


@pytest.mark.parametrize("rows", [1, 7, 64, 300])
def test_packed_linear_computes_x_wt_plus_b(rows, rng):
    k, n = rng.randint(1, 700), rng.randint(1, 700)
    weight, bias, x = torch.randn(n, k), torch.randn(n), torch.randn(rows, k)
    packed = cpu_gemm.pack_weight(weight)
    assert packed is not None
    close(cpu_gemm.packed_linear(x, weight, packed, bias), F.linear(x, weight, bias))
    close(cpu_gemm.packed_linear(x, weight, packed), F.linear(x, weight))


def test_what_cannot_be_packed_goes_to_f_linear(fresh_seed):
    """No packed copy for a bf16, 1-D or empty weight; with none, or for an input of no
    rows, the product is F.linear's own."""
    weight = torch.randn(6, 5)
    assert cpu_gemm.pack_weight(weight.bfloat16()) is None
    assert cpu_gemm.pack_weight(torch.randn(5)) is None
    assert cpu_gemm.pack_weight(torch.empty(0, 5)) is None
    x = torch.randn(3, 5)
    assert torch.equal(cpu_gemm.packed_linear(x, weight, None), F.linear(x, weight))
    empty = cpu_gemm.packed_linear(x[:0], weight, cpu_gemm.pack_weight(weight))
    assert empty.shape == (0, 6)


def test_a_model_loaded_on_the_cpu_packs_its_large_linear_weights(monkeypatch, rng):
    """Every linear weight of at least MIN_PACK_BYTES is packed at load, every smaller one
    (cache-resident, faster through F.linear) is not (the threshold drawn among the model's
    own weight sizes)."""
    path = build_variant("tiny-llama", num_hidden_layers=rng.randint(1, 3))
    sizes = sorted({m.weight.numel() * 4 for m in load_model(path, torch.float32, "cpu").modules()
                    if isinstance(m, (LinearBase, ParallelLMHead))})
    threshold = rng.choice([0, *sizes, sizes[-1] + 1])
    monkeypatch.setattr(cpu_gemm, "MIN_PACK_BYTES", threshold)
    model = load_model(path, torch.float32, "cpu")
    layers = [m for m in model.modules() if isinstance(m, (LinearBase, ParallelLMHead))]
    assert len(layers) == 4 * len(model.model.layers) + 1
    assert all((layer.packed is not None) == (layer.weight.numel() * 4 >= threshold)
               for layer in layers), threshold


def packed_and_dense(layer: torch.nn.Module, run) -> tuple[torch.Tensor, ...]:
    """`run()`'s results with `layer`'s weight packed, then through its kernel path."""
    layer.pack_for_cpu()
    assert layer.packed is not None
    packed = run()
    layer.packed = None
    return packed, run()


def test_fused_forms_match_the_kernel_path(rng):
    hidden, inter, rows = rng.randint(8, 96), rng.randint(8, 96), rng.randint(1, 40)
    merged = MergedColumnParallelLinear(hidden, [inter, inter], bias=True)
    row = RowParallelLinear(inter, hidden, bias=True)
    norm = RMSNorm(hidden, 1e-6)
    for p in (*merged.parameters(), *row.parameters(), *norm.parameters()):
        p.data.normal_()
    x, h, residual = torch.randn(rows, hidden), torch.randn(rows, inter), torch.randn(rows, hidden)
    got, want = packed_and_dense(merged, lambda: merged.silu_mul(x))
    close(got, want)
    got, want = packed_and_dense(row, lambda: torch.cat(row.forward_and_norm(h, residual, norm)))
    close(got, want)
    got, want = packed_and_dense(row, lambda: row(h, residual))
    close(got, want)


def test_qkv_projection_rotates_and_stores_as_the_kernel_path(rng):
    heads, kv_heads, dim, tokens = 4, 2, 16, rng.randint(1, 20)
    hidden, block, blocks = rng.randint(8, 64), 8, 8
    qkv = QKVParallelLinear(hidden, dim, heads, kv_heads, bias=True)
    qkv.weight.data.normal_()
    qkv.bias.data.normal_()
    rotary = RotaryEmbedding(dim, dim, 256, 10000.0, None)
    attn = Attention(heads, dim, kv_heads, dim ** -0.5)
    x = torch.randn(tokens, hidden)
    positions = torch.randint(0, 256, (tokens,))
    slots = torch.randperm(blocks * block)[:tokens]
    meta = AttentionMetadata(slot_mapping=slots, query_start_loc=torch.arange(tokens + 1,
                                                                              dtype=torch.int32),
                             seq_lens=torch.ones(tokens, dtype=torch.int32),
                             block_tables=(slots // block).to(torch.int32)[:, None],
                             decode_only=True)

    def run() -> torch.Tensor:
        attn.k_cache = torch.zeros(blocks, block, kv_heads, dim)
        attn.v_cache = torch.zeros(blocks, block, kv_heads, dim)
        out = attn.forward_projected(x, qkv, rotary, positions, meta)
        return torch.cat([out.flatten(), attn.k_cache.flatten(), attn.v_cache.flatten()])

    got, want = packed_and_dense(qkv, run)
    close(got, want)


@pytest.mark.parametrize("fits", [True, False])
def test_weights_are_packed_only_while_the_copies_fit_the_memory_available(
        fits, monkeypatch, caplog, rng):
    """The packed copies double the linear weights' memory: a model whose copies would take
    more than PACK_FRACTION of MemAvailable keeps to its dense weights, and says so."""
    path = build_variant("tiny-llama", num_hidden_layers=rng.randint(1, 3))
    dense = load_model(path, torch.float32, "cpu")
    needed = sum(m.weight.numel() * 4 for m in dense.modules()
                 if isinstance(m, (LinearBase, ParallelLMHead)))
    limit = needed / cpu_gemm.PACK_FRACTION
    available = int(limit * (rng.uniform(1.01, 3.0) if fits else rng.uniform(0.2, 0.99)))
    monkeypatch.setattr(cpu_gemm, "mem_available_bytes", lambda: available)
    monkeypatch.setattr(cpu_gemm, "MIN_PACK_BYTES", 0)
    with caplog.at_level("INFO", logger="shardline"):
        model = load_model(path, torch.float32, "cpu")
    layers = [m for m in model.modules() if isinstance(m, (LinearBase, ParallelLMHead))]
    assert layers and all((layer.packed is not None) == fits for layer in layers)
    assert ("not packed" in caplog.text) != fits
    for layer in layers:
        x = torch.randn(rng.randint(1, 9), layer.weight.shape[1])
        forward = layer.matmul(x, None) if isinstance(layer, LinearBase) else layer(x)
        close(forward, F.linear(x, layer.weight))

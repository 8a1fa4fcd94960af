"""The CPU's fused element-wise passes (layers.cpu_ops): each computes what its torch
reference does, on one thread and split over several, refuses what it would misread, and
a model's layers on the CPU in fp32 run through them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from shardline import _cpu_kernels
from shardline.kernels import reference
from shardline.layers import cpu_ops
from shardline.models.loader import load_model
from shardline.presets import build_variant

# Rows enough that the passes split them over two threads (256 KiB a thread at least).
MANY_ROWS = 700


def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """A few ulps of the values' magnitude: the sums of squares run in another order, and
    SiLU's exp is good to 2e-7."""
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=2e-6, atol=2e-6 * scale)


@pytest.fixture(params=[1, 2], ids=["1-thread", "2-threads"])
def threads(request, monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: request.param)
    return request.param


@pytest.mark.parametrize("rows", [0, 1, 13, MANY_ROWS])
def test_rms_norm_matches_the_reference(rows, threads, rng):
    hidden = rng.randint(500, 900) if rows == MANY_ROWS else rng.randint(1, 900)
    x, residual, weight = torch.randn(rows, hidden), torch.randn(rows, hidden), torch.randn(hidden)
    eps = rng.choice([1e-6, 1e-5])
    close(cpu_ops.rms_norm(x, weight, eps), reference.rms_norm(x, weight, eps))
    out, summed = cpu_ops.rms_norm(x, weight, eps, residual)
    want_out, want_sum = reference.rms_norm(x, weight, eps, residual)
    assert torch.equal(summed, want_sum)
    close(out, want_out)
    before = x.clone()
    out, summed = cpu_ops.rms_norm(x, weight, eps, residual, sum_into_x=True)
    assert summed.data_ptr() == x.data_ptr() and torch.equal(x, before + residual)
    close(out, want_out)


@pytest.mark.parametrize("rows", [0, 1, 9, MANY_ROWS])
def test_silu_mul_matches_the_reference(rows, threads, rng):
    width = rng.randint(1000, 1600) if rows == MANY_ROWS else rng.randint(1, 1600)
    gate_up = torch.randn(rows, 2 * width) * rng.choice([1.0, 10.0])
    gate, up = gate_up.chunk(2, dim=-1)
    close(cpu_ops.silu_mul(gate_up), F.silu(gate) * up)


def test_silu_mul_keeps_infinities_and_nans_as_torch_does(fresh_seed):
    gate = torch.tensor([float("inf"), -float("inf"), float("nan"), 0.0, -0.0, 100.0, -100.0])
    gate_up = torch.cat([gate, torch.randn(gate.numel()).abs() + 1])[None]
    want = F.silu(gate) * gate_up[0, gate.numel():]
    got = cpu_ops.silu_mul(gate_up)[0]
    assert torch.equal(got.isnan(), want.isnan())
    finite = ~want.isnan()
    torch.testing.assert_close(got[finite], want[finite], rtol=1e-6, atol=1e-30)


def test_silu_mul_refuses_an_odd_width():
    with pytest.raises(ValueError, match="even"):
        cpu_ops.silu_mul(torch.randn(2, 7))


def caches(blocks: int, block: int, kv_heads: int, dim: int) -> tuple[torch.Tensor, ...]:
    k = torch.randn(blocks, block, kv_heads, dim)
    return k, torch.randn_like(k)


@pytest.mark.parametrize("tokens", [1, 11, MANY_ROWS])
def test_rotary_and_cache_write_match_the_reference(tokens, threads, rng):
    heads, kv_heads = rng.choice([(8, 4), (4, 4), (6, 2)])
    dim = rng.choice([16, 64])
    rot = rng.choice([dim, dim // 2])
    block = rng.choice([4, 16])
    blocks = -(-tokens // block) + rng.randint(1, 4)
    rotary_table = torch.randn(rng.randint(1, 3000), rot)
    positions = torch.randint(0, rotary_table.shape[0], (tokens,))
    slots = torch.randperm(blocks * block)[:tokens]
    slots[torch.rand(tokens) < 0.2] = -1   # padding tokens: not stored
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim)
    k_cache, v_cache = caches(blocks, block, kv_heads, dim)
    want_k, want_v = k_cache.clone(), v_cache.clone()
    q = cpu_ops.rotary_and_write_kv_cache(qkv, heads, positions, rotary_table, k_cache, v_cache,
                                          slots)
    want_q = reference.qkv_rotary_and_write_kv_cache(
        qkv, torch.eye(qkv.shape[1]), None, positions, rotary_table, True, want_k, want_v,
        slots, heads)
    close(q, want_q)
    close(k_cache, want_k)
    assert torch.equal(v_cache, want_v)


@pytest.mark.parametrize("bad", ["position", "slot"])
def test_rotary_refuses_a_position_or_slot_out_of_range_and_writes_nothing(bad, rng):
    heads, kv_heads, dim, tokens = 2, 1, 8, rng.randint(2, 9)
    table = torch.randn(32, dim)
    positions = torch.randint(0, 32, (tokens,))
    slots = torch.randperm(4 * 4)[:tokens]
    victim = rng.randrange(tokens)
    if bad == "position":
        positions[victim] = rng.choice([-1, 32, 10**6])
    else:
        slots[victim] = rng.choice([-2, 16, 10**6])
    k_cache, v_cache = caches(4, 4, kv_heads, dim)
    before = k_cache.clone(), v_cache.clone()
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim)
    with pytest.raises(IndexError, match=f"{'positions' if bad == 'position' else 'slot_mapping'}"
                                         rf"\[{victim}\]"):
        cpu_ops.rotary_and_write_kv_cache(qkv, heads, positions, table, k_cache, v_cache, slots)
    assert torch.equal(k_cache, before[0]) and torch.equal(v_cache, before[1])


def test_shapes_and_dtypes_the_passes_would_misread_are_refused():
    with pytest.raises(ValueError, match="weight has shape"):
        cpu_ops.rms_norm(torch.randn(3, 8), torch.randn(7), 1e-6)
    with pytest.raises(ValueError, match="residual is torch.float64"):
        cpu_ops.rms_norm(torch.randn(3, 8), torch.randn(8), 1e-6, torch.randn(3, 8).double())
    k_cache, v_cache = caches(2, 4, 1, 8)
    with pytest.raises(ValueError, match="qkv has shape"):
        cpu_ops.rotary_and_write_kv_cache(torch.randn(3, 31), 2, torch.zeros(3, dtype=torch.long),
                                          torch.randn(8, 8), k_cache, v_cache,
                                          torch.zeros(3, dtype=torch.long))


def test_a_cpu_fp32_model_runs_its_element_wise_passes_in_cpp(monkeypatch, rng):
    """Each decoder layer calls the rotary pass once, SiLU-mul once and the norm twice (the
    first layer's input norm and the final norm once more), and the logits are those of
    the torch path the passes replaced (every pass refused: applies() False)."""
    layers = rng.randint(1, 3)
    model = load_model(build_variant("tiny-llama", num_hidden_layers=layers), torch.float32,
                       "cpu")
    calls = {"rms_norm": 0, "silu_mul": 0, "rotary_write_kv": 0}
    for name in calls:
        real = getattr(_cpu_kernels, name)

        def counted(*args, _real=real, _name=name, **kwargs):
            calls[_name] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(_cpu_kernels, name, counted)
    tokens = rng.randint(2, 12)
    logits = run_prefill(model, tokens)
    assert calls == {"rms_norm": 2 * layers + 1, "silu_mul": layers, "rotary_write_kv": layers}
    monkeypatch.setattr(cpu_ops, "applies", lambda x: False)
    close(logits, run_prefill(model, tokens))


def run_prefill(model, tokens: int) -> torch.Tensor:
    """The logits of one prompt of `tokens` random ids, its K/V in fresh caches."""
    from shardline.layers.attention import AttentionMetadata

    torch.manual_seed(tokens)
    block = 16
    blocks = -(-tokens // block)
    for attn in model.attention_layers():
        attn.k_cache = torch.zeros(blocks, block, attn.num_kv_heads, attn.head_dim)
        attn.v_cache = torch.zeros_like(attn.k_cache)
    meta = AttentionMetadata(
        slot_mapping=torch.arange(tokens), query_start_loc=torch.tensor([0, tokens],
                                                                         dtype=torch.int32),
        seq_lens=torch.tensor([tokens], dtype=torch.int32),
        block_tables=torch.arange(blocks, dtype=torch.int32)[None], decode_only=False)
    ids = torch.randint(0, model.config["vocab_size"], (tokens,))
    with torch.inference_mode():
        return model.compute_logits(model(ids, torch.arange(tokens), meta))

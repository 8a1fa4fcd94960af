"""The Triton fused MoE against its torch reference, including expert parallelism."""

import pytest
import torch

from checks import DEVICES, assert_close, dtypes, force_triton

from shardline import kernels
from shardline.kernels import reference

pytest.importorskip("triton")

from shardline.kernels import moe

pytestmark = pytest.mark.usefixtures("fresh_seed")

TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}


@pytest.fixture
def nan_empty(monkeypatch):
    """torch.empty returns NaN-filled floats, so intermediates the kernels skip show up."""
    real_empty = torch.empty

    def empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t
    monkeypatch.setattr(torch, "empty", empty)


def moe_inputs(tokens, hidden, inter, experts, global_experts, topk, dtype, device):
    x = torch.randn(tokens, hidden, dtype=dtype, device=device)
    w13 = torch.randn(experts, 2 * inter, hidden, dtype=dtype, device=device) / hidden ** 0.5
    w2 = torch.randn(experts, hidden, inter, dtype=dtype, device=device) / inter ** 0.5
    scores = torch.randn(tokens, global_experts, device=device)
    weights, ids = scores.softmax(-1).topk(topk, dim=-1)
    return x, w13, w2, weights.to(dtype), ids


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("tokens,hidden,inter,experts,topk", [
    (7, 40, 24, 4, 2), (1, 32, 48, 8, 2), (20, 24, 36, 3, 1), (33, 16, 16, 6, 3),
    (40, 16, 16, 40, 2)])
def test_fused_moe_matches_reference(nan_empty, device, tokens, hidden, inter, experts, topk):
    for dtype in dtypes(device):
        x, w13, w2, weights, ids = moe_inputs(tokens, hidden, inter, experts, experts, topk,
                                              dtype, device)
        out = torch.full_like(x, float("nan"))
        moe.fused_moe(x, w13, w2, weights, ids, out=out)
        assert_close(out, reference.fused_moe(x, w13, w2, weights, ids), TOLERANCE)


@pytest.mark.parametrize("device", DEVICES)
def test_fused_moe_skips_experts_of_other_ranks(nan_empty, device):
    tokens, hidden, inter, local, ranks, topk = 9, 24, 20, 3, 3, 2
    for rank in range(ranks):
        x, w13, w2, weights, ids = moe_inputs(tokens, hidden, inter, local, local * ranks,
                                              topk, torch.float32, device)
        offset = rank * local
        out = torch.full_like(x, float("nan"))
        moe.fused_moe(x, w13, w2, weights, ids, offset, out=out)
        assert_close(out, reference.fused_moe(x, w13, w2, weights, ids, offset), TOLERANCE)


def test_fused_moe_with_no_owned_choices_is_zero(nan_empty):
    x, w13, w2, weights, ids = moe_inputs(5, 16, 16, 2, 2, 1, torch.float32, "cpu")
    assert torch.equal(moe.fused_moe(x, w13, w2, weights, ids, expert_offset=2),
                       torch.zeros_like(x))


def test_fused_moe_with_no_expert_per_token_is_zero(nan_empty):
    x, w13, w2, weights, ids = moe_inputs(5, 16, 16, 2, 2, 1, torch.float32, "cpu")
    out = torch.full_like(x, float("nan"))
    moe.fused_moe(x, w13, w2, weights[:, :0], ids[:, :0], out=out)
    assert torch.equal(out, torch.zeros_like(x))


@pytest.mark.parametrize("experts,tokens,topk", [(5, 11, 2), (300, 70, 3)])
def test_moe_align_pads_each_expert_to_the_block(experts, tokens, topk):
    block_m, offset = 4, 2
    ids = torch.randint(0, experts + 2 * offset, (tokens, topk))
    ids[ids == offset + 1] = offset  # local expert 1 gets no tokens
    sorted_pairs, block_experts = moe.moe_align(ids, block_m, offset, experts)
    local = ids.flatten() - offset
    owner = torch.where((local >= 0) & (local < experts), local, moe.NOT_OWNED.value)
    runs: dict[int, list[int]] = {}
    for block, expert in zip(sorted_pairs.view(-1, block_m).tolist(), block_experts.tolist()):
        pairs = [p for p in block if p < ids.numel()]
        if expert == moe.PAST_END.value:
            assert not pairs
            continue
        assert pairs, "a block with no pairs before the end"
        assert {int(owner[p]) for p in pairs} == {expert}
        runs.setdefault(expert, []).extend(pairs)
    assert sorted(p for run in runs.values() for p in run) == list(range(ids.numel()))
    assert all(run == sorted(run) for run in runs.values()), "order within an expert"
    assert 1 not in runs


def test_fused_moe_rejects_mismatched_shapes():
    x, w13, w2, weights, ids = moe_inputs(4, 16, 8, 2, 2, 1, torch.float32, "cpu")
    with pytest.raises(ValueError, match="w2 must be"):
        moe.fused_moe(x, w13, w2[:, :8], weights, ids)
    with pytest.raises(ValueError, match="topk_weights must have"):
        moe.fused_moe(x, w13, w2, weights[:2], ids)


def test_dispatch_routes_cpu_tensors_to_triton_only_when_forced(monkeypatch):
    monkeypatch.setattr(moe, "fused_moe", lambda *args: "triton moe")
    args = moe_inputs(4, 16, 8, 2, 2, 1, torch.float32, "cpu")
    force_triton(monkeypatch, True)
    assert kernels.fused_moe(*args) == "triton moe"
    force_triton(monkeypatch, False)
    assert torch.equal(kernels.fused_moe(*args), reference.fused_moe(*args))


def test_kernel_compiles_for_h100(compile_for_h100):
    io = dict(a_ptr="*bf16", w_ptr="*bf16", sorted_pairs_ptr="*i32",
              block_experts_ptr="*i32", topk_weights_ptr="*bf16")
    compile_for_h100("shardline.kernels.moe", [
        ("_moe_gemm_kernel", {**io, "out_ptr": "*bf16" if gate_up else "*fp32"},
         dict(GATE_UP=gate_up, PRECISION="tf32", BLOCK_M=64, BLOCK_N=128, BLOCK_K=64))
        for gate_up in (True, False)
    ] + [("_moe_align_kernel", dict(ids_ptr="*i64", sorted_pairs_ptr="*i32",
                                    block_experts_ptr="*i32"),
          dict(BLOCK_M=16, BLOCK_E=16, CHUNK=256))])

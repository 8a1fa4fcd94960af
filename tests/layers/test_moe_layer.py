import pytest
import torch

from shardline.distributed import parallel_state
from shardline.distributed.parallel_state import GroupCoordinate
from shardline.layers.moe import FusedMoE, select_experts


def test_select_experts_top_k_and_renormalize():
    logits = torch.randn(5, 6)
    w, ids = select_experts(logits, 2, renormalize=False)
    probs = logits.softmax(-1)
    assert torch.equal(ids, probs.topk(2).indices)
    torch.testing.assert_close(w, probs.topk(2).values)
    w_norm, _ = select_experts(logits, 2, renormalize=True)
    torch.testing.assert_close(w_norm.sum(-1), torch.ones(5))


def per_expert_layer(gate, up, down, renormalize: bool) -> FusedMoE:
    """A layer loaded from one gate, up and down matrix per expert (Mixtral's layout)."""
    experts, inter, hidden = gate.shape
    layer = FusedMoE(experts, 2, hidden, inter, renormalize=renormalize)
    for e in range(experts):
        layer.weight_loader(layer.w13, gate[e], f"{e}.w1", "gate", expert_id=e)
        layer.weight_loader(layer.w13, up[e], f"{e}.w3", "up", expert_id=e)
        layer.weight_loader(layer.w2, down[e], f"{e}.w2", "down", expert_id=e)
    return layer


def fused_layer(gate, up, down, renormalize: bool) -> FusedMoE:
    """A layer loaded from all experts' gate_up and down stacked (Qwen2-MoE's layout)."""
    experts, inter, hidden = gate.shape
    layer = FusedMoE(experts, 2, hidden, inter, renormalize=renormalize)
    layer.weight_loader(layer.w13, torch.cat([gate, up], dim=1), "gate_up_proj", "gate_up")
    layer.weight_loader(layer.w2, down, "down_proj", "down_all")
    return layer


def test_per_expert_and_fused_checkpoints_load_the_same():
    experts, hidden, inter = 3, 4, 6
    gate, up = torch.randn(experts, inter, hidden), torch.randn(experts, inter, hidden)
    down = torch.randn(experts, hidden, inter)
    per_expert = per_expert_layer(gate, up, down, renormalize=True)
    fused = fused_layer(gate, up, down, renormalize=True)
    assert torch.equal(per_expert.w13, fused.w13) and torch.equal(per_expert.w2, fused.w2)
    x, router = torch.randn(7, hidden), torch.randn(7, experts)
    w, ids = select_experts(router, 2, renormalize=True)
    expected = torch.zeros(7, hidden)
    for t in range(7):
        for slot in range(2):
            e = int(ids[t, slot])
            h = torch.nn.functional.silu(gate[e] @ x[t]) * (up[e] @ x[t])
            expected[t] += w[t, slot] * (down[e] @ h)
    torch.testing.assert_close(fused(x, router), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tp", [2, 4])
def test_under_tp_each_rank_holds_its_slice_of_every_experts_intermediate(monkeypatch, tp):
    """Each TP rank holds intermediate/tp rows of every expert's gate and up, and the same
    columns of its down (from per-expert and from fused checkpoints alike), and the ranks'
    partial outputs add up to the whole layer's."""
    experts, hidden, inter = 4, 6, 8
    gate, up = torch.randn(experts, inter, hidden), torch.randn(experts, inter, hidden)
    down = torch.randn(experts, hidden, inter)
    x, router = torch.randn(9, hidden), torch.randn(9, experts)
    w, ids = select_experts(router, 2, renormalize=False)
    whole = fused_layer(gate, up, down, renormalize=False)
    part, total = inter // tp, torch.zeros(9, hidden)
    for rank in range(tp):
        monkeypatch.setattr(parallel_state, "_tp", GroupCoordinate(rank, tp))
        rows = slice(rank * part, (rank + 1) * part)
        fused = fused_layer(gate, up, down, renormalize=False)
        for layer in (per_expert_layer(gate, up, down, renormalize=False), fused):
            assert torch.equal(layer.w13, torch.cat([gate[:, rows], up[:, rows]], dim=1))
            assert torch.equal(layer.w2, down[:, :, rows])
        total += fused.local_forward(x, w, ids)
    torch.testing.assert_close(total, whole.local_forward(x, w, ids), rtol=1e-5, atol=1e-5)

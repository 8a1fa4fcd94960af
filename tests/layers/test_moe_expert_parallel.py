"""An expert-parallel rank builds and loads only its own experts, whole (no processes:
the rank's coordinates are installed directly and nothing here communicates)."""

from __future__ import annotations

import pytest
import torch

from shardline.distributed.parallel_state import GroupCoordinate, set_parallel_state
from shardline.layers.moe import FusedMoE
from shardline.models.mixtral import MixtralForCausalLM
from shardline.presets import PRESETS

EXPERTS, HIDDEN, INTER = 4, 8, 6


class RecordedSlice:
    """A checkpoint tensor read lazily, as a safetensors slice is; records each read."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor, self.reads = tensor, []

    def get_shape(self) -> list[int]:
        return list(self.tensor.shape)

    def __getitem__(self, index: tuple) -> torch.Tensor:
        self.reads.append(index)
        return self.tensor[index]


@pytest.fixture
def ep_rank_1_of_2():
    """This process as rank 1 of a TP = EP group of 2 with expert parallelism on."""
    rank = GroupCoordinate(rank=1, size=2)
    set_parallel_state(rank, GroupCoordinate(), ep=rank, expert_dispatch="all_to_all")
    yield
    set_parallel_state(GroupCoordinate(name="tp"), GroupCoordinate(name="pp"))


def test_fused_checkpoint_reads_only_this_ranks_experts(ep_rank_1_of_2, fresh_seed):
    gate, up = torch.randn(EXPERTS, INTER, HIDDEN), torch.randn(EXPERTS, INTER, HIDDEN)
    down = torch.randn(EXPERTS, HIDDEN, INTER)
    moe = FusedMoE(EXPERTS, 2, HIDDEN, INTER, renormalize=True)
    assert moe.local_experts == range(2, 4)
    gate_up, down_all = RecordedSlice(torch.cat([gate, up], dim=1)), RecordedSlice(down)
    moe.weight_loader(moe.w13, gate_up, "gate_up_proj", "gate_up")
    moe.weight_loader(moe.w2, down_all, "down_proj", "down_all")
    mine = (slice(2, 4), slice(None), slice(None))
    assert gate_up.reads == [mine] and down_all.reads == [mine]
    assert torch.equal(moe.w13, torch.cat([gate, up], dim=1)[2:])
    assert torch.equal(moe.w2, down[2:])

    per_expert = FusedMoE(EXPERTS, 2, HIDDEN, INTER, renormalize=True)
    for e in per_expert.local_experts:
        per_expert.weight_loader(per_expert.w13, gate[e], f"{e}.w1", "gate", expert_id=e)
        per_expert.weight_loader(per_expert.w13, up[e], f"{e}.w3", "up", expert_id=e)
        per_expert.weight_loader(per_expert.w2, down[e], f"{e}.w2", "down", expert_id=e)
    assert torch.equal(per_expert.w13, moe.w13) and torch.equal(per_expert.w2, moe.w2)
    with pytest.raises(ValueError, match=r"expert_id=1 for '1.w1' is invalid: this rank holds "
                                         r"experts \[2, 4\)"):
        per_expert.weight_loader(per_expert.w13, gate[1], "1.w1", "gate", expert_id=1)


def test_model_asks_the_checkpoint_for_this_ranks_experts_only(ep_rank_1_of_2):
    config = dict(PRESETS["tiny-mixtral"], num_hidden_layers=1)
    model = MixtralForCausalLM(config, torch.float32, 64)
    sources = model.weight_sources()
    experts = "model.layers.0.block_sparse_moe.experts"
    per_expert, fused = sources[f"{experts}.w13"]
    assert sorted({e for _, _, e in per_expert}) == [2, 3]
    assert [name for name, _, _ in fused] == [f"{experts}.gate_up_proj"]
    per_expert, _ = sources[f"{experts}.w2"]
    assert [name for name, _, _ in per_expert] == [f"{experts}.2.w2.weight",
                                                   f"{experts}.3.w2.weight"]

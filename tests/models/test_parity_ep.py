"""Expert-parallel layouts against one rank and against transformers, through the
multi-process executor (gloo, fp32, CPU): greedy tokens identical to the one-rank run,
prompt logits within 1e-4 relative of the reference. Invalid EP layouts are refused
before any worker starts.

With DP = SP = 1 the EP group is the TP group, so EPn is TPn with enable_expert_parallel:
attention TP-split, each rank owning 1/n of the experts whole. Each layout runs one of
the two dispatch paths; together they cover both on both models, EP2 and EP4 on both,
and EP under pipeline parallelism (Qwen2-MoE: layers 0-1, one of them dense, on the first
stage, layer 2 on the second; each stage's EP group is its own TP pair).
"""

from __future__ import annotations

import multiprocessing

import pytest
from layout_parity import BLOCK_SIZE, NUM_BLOCKS, matching_layout, random_prompts

from shardline.config import CacheConfig, EngineConfig, ModelConfig, ParallelConfig, SchedulerConfig
from shardline.executor.base import check_layout
from shardline.executor.multiproc import MultiProcExecutor
from shardline.models.loader import read_config
from shardline.presets import build_variant, resolve_model
from shardline.worker.worker import Worker

# id: (preset, config overrides, TP (= EP), PP, dispatch path)
LAYOUTS = {
    "mixtral-ep2-all_to_all": ("tiny-mixtral", {}, 2, 1, "all_to_all"),
    "mixtral-ep4-8experts-all_gather": ("tiny-mixtral", {"num_local_experts": 8}, 4, 1,
                                        "all_gather"),
    "qwen2-moe-ep2xpp2-all_gather": ("tiny-qwen2-moe", {}, 2, 2, "all_gather"),
    "qwen2-moe-ep4-all_to_all": ("tiny-qwen2-moe", {}, 4, 1, "all_to_all"),
}


class ExpertShapesWorker(Worker):
    """The model worker, which also reports the shapes of the expert weights it holds."""

    def expert_shapes(self) -> dict[str, list[int]]:
        return {name: list(p.shape) for name, p in self.model_runner.model.named_parameters()
                if ".experts." in name}


def _engine_config(model: str, **parallel: object) -> EngineConfig:
    return EngineConfig(ModelConfig(model, dtype="float32"),
                        CacheConfig(block_size=BLOCK_SIZE, num_blocks=NUM_BLOCKS),
                        SchedulerConfig(), ParallelConfig(device="cpu", **parallel))


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_ep_layout_matches_one_rank_and_transformers(layout, hf_model, fresh_seed):
    preset, overrides, tp, pp, dispatch = LAYOUTS[layout]
    model = build_variant(preset, **overrides) if overrides else resolve_model(preset)
    parallel = ParallelConfig(device="cpu", tensor_parallel_size=tp, pipeline_parallel_size=pp,
                              enable_expert_parallel=True, expert_dispatch=dispatch,
                              worker_cls="test_parity_ep.ExpertShapesWorker")
    with matching_layout(model, parallel, random_prompts(4, (3, 40)), hf_model) as executor:
        _check_expert_layout(executor, read_config(model), tp, dispatch)


def _check_expert_layout(executor: MultiProcExecutor, hf: dict, ep: int, dispatch: str) -> None:
    """Every rank holds 1/ep of the experts, whole; the all-to-all path moved tokens."""
    experts = hf.get("num_local_experts") or hf["num_experts"]
    inter = hf.get("moe_intermediate_size") or hf["intermediate_size"]
    for rank, shapes in enumerate(executor.collective_rpc("expert_shapes")):
        assert shapes, f"rank {rank} holds no experts"
        for name, shape in shapes.items():
            whole = [2 * inter, hf["hidden_size"]] if name.endswith("w13") else \
                [hf["hidden_size"], inter]
            assert shape == [experts // ep, *whole], f"rank {rank} {name}: {shape}"
    for rank, stats in enumerate(executor.collective_rpc("comm_stats")):
        moved = sum(group["bytes_sent"].get("all_to_all", 0) for kinds, group in stats.items()
                    if "ep" in kinds.split("+"))
        assert (moved > 0) == (dispatch == "all_to_all"), f"rank {rank}: {stats}"


@pytest.mark.parametrize("preset, overrides, parallel, message", [
    ("tiny-llama", {}, dict(tensor_parallel_size=2),
     "dense model with no experts to split: set enable_expert_parallel=False"),
    ("tiny-mixtral", {"num_local_experts": 6}, dict(tensor_parallel_size=4),
     r"6 experts over an EP group of 4 ranks .* use an EP size in \[1, 2, 3, 6\]"),
])
def test_invalid_ep_layout_refused_before_spawning(preset, overrides, parallel, message,
                                                   monkeypatch):
    model = build_variant(preset, **overrides) if overrides else resolve_model(preset)
    config = _engine_config(model, enable_expert_parallel=True, **parallel)

    def refuse(process):
        raise AssertionError(f"process {process.name} was started for an invalid layout")

    monkeypatch.setattr(multiprocessing.process.BaseProcess, "start", refuse)
    with pytest.raises(ValueError, match=message):
        check_layout(config)
    with pytest.raises(ValueError, match=message):
        MultiProcExecutor(config)


def test_unknown_dispatch_path_refused():
    with pytest.raises(ValueError, match=r"expert_dispatch='ring' is invalid: must be one of "
                                         r"\('all_to_all', 'all_gather'\)"):
        ParallelConfig(tensor_parallel_size=2, enable_expert_parallel=True,
                       expert_dispatch="ring")

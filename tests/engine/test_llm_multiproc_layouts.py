"""Layouts the engine refuses with a ValueError naming the rule, before any process starts:
tensor parallelism that does not divide the attention heads or straddles KV heads, more
pipeline stages than layers, stage layer counts that do not add up, one rank asked of a
multi-rank layout, and CUDA ranks beyond the machine's GPUs (or without a GPU)."""

from __future__ import annotations

import pytest
import torch

from shardline import LLM, AsyncLLM
from shardline.config import ParallelConfig
from shardline.models.loader import read_model_info
from shardline.models.partition import check_partition
from shardline.presets import build_variant

MODEL = "tiny-llama"  # 4 heads, 2 KV heads, 2 layers
pytestmark = pytest.mark.usefixtures("no_process_left_behind")


def _kv3_variant() -> str:
    return build_variant(MODEL, num_attention_heads=6, num_key_value_heads=3)


def test_kv_head_rule_replicates_or_splits_but_never_straddles():
    """6 heads, 3 KV heads: TP 3 splits the KV heads, TP 6 replicates each on 2 ranks;
    TP 2 would put one and a half KV heads on a rank."""
    info = read_model_info(_kv3_variant())
    for tp in (1, 3, 6):
        check_partition(ParallelConfig(tensor_parallel_size=tp), info)
    with pytest.raises(ValueError, match="3 KV heads"):
        check_partition(ParallelConfig(tensor_parallel_size=2), info)


INVALID = {
    "heads-tp3": (MODEL, dict(tensor_parallel_size=3),
                  r"tensor_parallel_size=3 does not divide the model's 4 attention heads: "
                  r"use one of \[1, 2, 4\]"),
    "kv-heads-tp2": ("kv3", dict(tensor_parallel_size=2),
                     r"tensor_parallel_size=2 and the model's 3 KV heads: the heads' split "
                     r"must divide the KV heads, or be a multiple of them .*use one of "
                     r"\[1, 3, 6\]"),
    "kv-heads-sp2": ("kv3", dict(sequence_parallel_size=2),
                     r"tensor_parallel_size=1 x sequence_parallel_size=2 = 2 and the model's 3 "
                     r"KV heads: the heads' split must divide the KV heads, or be a multiple "
                     r"of them .*use a product in \[1, 3, 6\]"),
    "layers-pp3": (MODEL, dict(pipeline_parallel_size=3),
                   r"pipeline_parallel_size=3 is larger than the model's 2 layers: use at "
                   r"most 2 stages"),
    "stages-sum": (MODEL, dict(pipeline_parallel_size=2, pipeline_stage_layers=[1, 2]),
                   r"pipeline_stage_layers=\[1, 2\] adds up to 3 layers, but the model has 2"),
    "stages-count": (MODEL, dict(pipeline_parallel_size=2, pipeline_stage_layers=[2]),
                     r"pipeline_stage_layers=\[2\] is invalid: must be None or a list of 2 "
                     r"layer counts"),
    "stages-sum-mp-world1": (MODEL, dict(pipeline_stage_layers=[3],
                                         distributed_executor_backend="mp"),
                             r"pipeline_stage_layers=\[3\] adds up to 3 layers, but the model "
                             r"has 2"),
    "uni-tp2": (MODEL, dict(tensor_parallel_size=2, distributed_executor_backend="uni"),
                r"distributed_executor_backend='uni' runs one rank, but the layout has "
                r"world_size=2: use 'mp'"),
}


@pytest.mark.parametrize("entry", [LLM, AsyncLLM], ids=["LLM", "AsyncLLM"])
@pytest.mark.parametrize("case", list(INVALID))
def test_invalid_layout_raises_before_any_process_starts(case, entry, no_spawn):
    model, options, message = INVALID[case]
    model = _kv3_variant() if model == "kv3" else model
    with pytest.raises(ValueError, match=message):
        entry(model, **options)


def _layout_beyond(gpus: int) -> dict | None:
    """The smallest tiny-llama layout with more ranks than `gpus`."""
    for layout in (dict(tensor_parallel_size=2), dict(tensor_parallel_size=4),
                   dict(tensor_parallel_size=4, pipeline_parallel_size=2)):
        if ParallelConfig(**layout).world_size > gpus:
            return layout
    return None


def test_cuda_with_more_ranks_than_gpus_raises_before_any_process_starts(no_spawn):
    gpus = torch.cuda.device_count()
    layout = _layout_beyond(gpus)
    if layout is None:
        pytest.skip(f"{gpus} GPUs hold every tiny-llama layout")
    world = ParallelConfig(**layout).world_size
    message = (r"device='cuda' .* but torch sees no GPU.*use device='cpu'" if gpus == 0
               else rf"the layout needs {world} ranks .* this machine has {gpus} GPUs")
    with pytest.raises(ValueError, match=message):
        LLM(MODEL, device="cuda", **layout)


@pytest.mark.parametrize("gpus", [1, 2, 3])
def test_more_ranks_than_a_machines_gpus_raises_before_any_process_starts(gpus, monkeypatch,
                                                                          no_spawn):
    """The rule itself, on any host: torch is made to report `gpus` GPUs."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    layout = _layout_beyond(gpus)
    parallel = ParallelConfig(**layout)
    with pytest.raises(ValueError, match=(
            rf"the layout needs {parallel.world_size} ranks \(tensor_parallel_size="
            rf"{parallel.tensor_parallel_size} x pipeline_parallel_size="
            rf"{parallel.pipeline_parallel_size} x data_parallel_size=1 x "
            rf"sequence_parallel_size=1\) but this machine has {gpus} GPUs: use at most "
            rf"{gpus} ranks, or device='cpu'")):
        LLM(MODEL, device="cuda", **layout)


@pytest.mark.skipif(torch.cuda.device_count() > 0, reason="this machine has a GPU")
@pytest.mark.parametrize("backend", [None, "mp"])
def test_cuda_without_a_gpu_raises_before_any_process_starts(backend, no_spawn):
    with pytest.raises(ValueError, match=r"device='cuda' .* but torch sees no GPU.*"
                                         r"use device='cpu'"):
        LLM(MODEL, device="cuda", distributed_executor_backend=backend)


@pytest.mark.skipif(torch.cuda.device_count() > 0, reason="this machine has a GPU")
def test_cuda_asked_by_the_environment_is_named_as_such(monkeypatch, no_spawn):
    """The message named a device=None the caller never passed (from the command line:
    --device=None) beside the variable that asked for the GPU."""
    monkeypatch.setenv("SHARDLINE_DEVICE", "cuda")
    with pytest.raises(ValueError) as caught:
        LLM(MODEL, tensor_parallel_size=2)
    assert str(caught.value).startswith("SHARDLINE_DEVICE='cuda' asks for cuda")
    assert "device=None" not in str(caught.value)

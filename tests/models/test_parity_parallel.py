"""Every TP/PP layout against one rank and against transformers, through the multi-process
executor (gloo, fp32, CPU): greedy tokens identical to the one-rank run, prompt logits
within 1e-4 relative of the reference."""

from __future__ import annotations

import pytest

from layout_parity import assert_layout_matches, random_prompts
from shardline.config import ParallelConfig
from shardline.presets import build_variant, resolve_model

# id: (preset, config overrides, TP, PP, layers per stage or None for the balanced split)
LAYOUTS = {
    "tp2": ("tiny-llama", {}, 2, 1, None),
    "tp4": ("tiny-llama", {"num_key_value_heads": 4}, 4, 1, None),  # one KV head a rank
    "tp4-replicated-kv-heads": ("tiny-llama", {}, 4, 1, None),  # 2 KV heads over 4 ranks
    "tp2-odd-vocab": ("tiny-llama", {"vocab_size": 321}, 2, 1, None),
    "pp2-tied-embeddings": ("tiny-llama3", {}, 1, 2, None),
    "pp3-uneven": ("tiny-llama", {"num_hidden_layers": 5}, 1, 3, [1, 3, 1]),
    "tp2xpp2": ("tiny-qwen2", {"num_hidden_layers": 3}, 2, 2, None),
    "mixtral-tp2": ("tiny-mixtral", {}, 2, 1, None),
    "mixtral-tp2xpp2": ("tiny-mixtral", {}, 2, 2, None),
    "qwen2-moe-tp2": ("tiny-qwen2-moe", {}, 2, 1, None),
    "qwen2-moe-tp2xpp2": ("tiny-qwen2-moe", {}, 2, 2, None),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_one_rank_and_transformers(layout, hf_model, fresh_seed):
    preset, overrides, tp, pp, stages = LAYOUTS[layout]
    model = build_variant(preset, **overrides) if overrides else resolve_model(preset)
    parallel = ParallelConfig(tensor_parallel_size=tp, pipeline_parallel_size=pp,
                              pipeline_stage_layers=stages, device="cpu")
    assert_layout_matches(model, parallel, random_prompts(4, (3, 40)), hf_model)

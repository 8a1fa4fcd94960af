"""Sequence parallelism (Ulysses) against one rank and against transformers, through the
multi-process executor (gloo, fp32, CPU): greedy tokens identical to the one-rank run,
prompt logits within 1e-4 relative of the reference."""

from __future__ import annotations

import pytest

from layout_parity import assert_layout_matches, random_prompts
from shardline.config import ParallelConfig
from shardline.presets import resolve_model

# id: (preset, SP, TP, PP, token budget per step, number of prompts, prompt lengths)
LAYOUTS = {
    "sp2": ("tiny-llama", 2, 1, 1, 48, 4, (3, 40)),
    # 2 KV heads over TP2 leave one per TP rank, which both SP ranks of it keep whole.
    "sp2xtp2": ("tiny-llama", 2, 2, 1, 48, 4, (3, 40)),
    # 2 KV heads over SP4: ranks 0 and 1 keep head 0, ranks 2 and 3 head 1. One prompt, so
    # its decode steps have one token for four ranks: three hold only padding.
    "sp4-shared-kv-heads-one-token-steps": ("tiny-llama", 4, 1, 1, 48, 1, (3, 40)),
    # Prompts longer than the budget: their prefill is chunked over several SP steps.
    "sp2-chunked-long-prompts": ("tiny-qwen2", 2, 1, 1, 16, 3, (40, 60)),
    "sp2xpp2": ("tiny-qwen2", 2, 1, 2, 48, 4, (3, 40)),
    "mixtral-sp2": ("tiny-mixtral", 2, 1, 1, 48, 4, (3, 40)),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_sp_layout_matches_one_rank_and_transformers(layout, hf_model, fresh_seed):
    preset, sp, tp, pp, budget, count, lengths = LAYOUTS[layout]
    parallel = ParallelConfig(sequence_parallel_size=sp, tensor_parallel_size=tp,
                              pipeline_parallel_size=pp, device="cpu")
    assert_layout_matches(resolve_model(preset), parallel, random_prompts(count, lengths),
                          hf_model, max_tokens=8, token_budget=budget)

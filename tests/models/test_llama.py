"""The Llama family's model classes, beyond the parity tests: what they hold in memory."""

from __future__ import annotations

import pytest
import torch

from shardline.models.loader import load_model
from shardline.presets import build_variant


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-qwen2", "tiny-mixtral", "tiny-qwen2-moe"])
def test_the_rotary_table_is_held_once_for_all_layers(preset, rng):
    """Every layer reads the same cos/sin table: the model's buffers are that one table,
    whatever the number of layers (one table per layer cost Llama 3.1 8B 2 GiB)."""
    layers = rng.randint(2, 5)
    model = load_model(build_variant(preset, num_hidden_layers=layers), torch.float32, "cpu",
                       max_position=rng.randint(64, 512))
    tables = {model.model.layers[i].self_attn.rotary_emb.cos_sin_cache.data_ptr()
              for i in range(layers)}
    assert len(tables) == 1
    table = model.model.layers[0].self_attn.rotary_emb.cos_sin_cache
    assert sum(b.nbytes for b in model.buffers()) == table.nbytes

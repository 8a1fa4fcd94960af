"""Layers over pipeline stages: the balanced split, the override list, and what each
stage's model holds (its own layers; the embedding on the first stage, the final norm and
the LM head on the last)."""

from __future__ import annotations

import re

import pytest
import torch

from shardline.models.loader import load_model
from shardline.models.partition import stage_layer_counts, stage_layer_range
from shardline.presets import build_variant


def test_the_balanced_split_differs_by_one_layer_at_most_with_the_extra_first(rng):
    for _ in range(200):
        layers = rng.randint(1, 96)
        stages = rng.randint(1, layers)
        counts = stage_layer_counts(layers, stages)
        assert len(counts) == stages and sum(counts) == layers, (layers, stages, counts)
        assert max(counts) - min(counts) <= 1, (layers, stages, counts)
        assert counts == sorted(counts, reverse=True), (layers, stages, counts)


def test_the_stage_ranges_tile_the_layers_in_order(rng):
    for _ in range(100):
        stages = rng.randint(1, 8)
        override = [rng.randint(1, 6) for _ in range(stages)] if rng.random() < 0.5 else None
        layers = sum(override) if override else rng.randint(stages, 64)
        ranges = [stage_layer_range(layers, stages, s, override) for s in range(stages)]
        assert [i for r in ranges for i in r] == list(range(layers))
        if override:
            assert [len(r) for r in ranges] == override
            assert stage_layer_counts(layers, stages, override) == override


def test_an_override_that_does_not_add_up_is_named(rng):
    layers = rng.randint(2, 40)
    override = [rng.randint(1, layers) for _ in range(3)]
    if sum(override) == layers:
        override[0] += 1
    with pytest.raises(ValueError, match=rf"pipeline_stage_layers={re.escape(str(override))} "
                                         rf"adds up to {sum(override)} layers, but the model "
                                         rf"has {layers}: give 3 counts that add up to {layers}"):
        stage_layer_counts(layers, 3, override)


def _layer_indices(model: torch.nn.Module) -> set[int]:
    return {int(m.group(1)) for name, _ in model.named_parameters()
            if (m := re.match(r"model\.layers\.(\d+)\.", name))}


@pytest.mark.parametrize("override", [None, [1, 3, 1]], ids=["balanced", "override"])
def test_each_stage_holds_only_its_layers_with_the_embedding_first_and_the_head_last(
        override):
    model_dir = build_variant("tiny-llama", num_hidden_layers=5)
    whole = load_model(model_dir, torch.float32, "cpu")
    params = dict(whole.named_parameters())
    for stage in range(3):
        layers = stage_layer_range(5, 3, stage, override)
        model = load_model(model_dir, torch.float32, "cpu", layers=layers)
        assert _layer_indices(model) == set(layers), stage
        names = {name for name, _ in model.named_parameters()}
        assert ("model.embed_tokens.weight" in names) == (stage == 0)
        assert ("model.norm.weight" in names) == (stage == 2)
        assert ("lm_head.weight" in names) == (stage == 2)
        for name, param in model.named_parameters():
            assert torch.equal(param, params[name]), name

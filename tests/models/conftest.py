"""The transformers reference models of the presets, shared by the parity tests."""

import warnings

import pytest
import torch
import transformers

from shardline.presets import resolve_model


@pytest.fixture(scope="session")
def hf_model():
    """Load a preset with transformers in fp32, once per session; EOS does not stop it,
    since the worker driven in these tests does not stop at EOS either."""
    cache = {}

    def get(name: str):
        if name not in cache:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = transformers.AutoModelForCausalLM.from_pretrained(
                    resolve_model(name), dtype=torch.float32).eval()
            model.generation_config.eos_token_id = None
            cache[name] = model
        return cache[name]
    return get

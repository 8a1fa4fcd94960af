"""Fixtures of the engine tests."""

import random

import pytest


@pytest.fixture
def seeded_random(fresh_seed):
    """Seeds the `random` module with the test's printed seed: fake_model.random_prompts
    draws from it."""
    random.seed(fresh_seed)

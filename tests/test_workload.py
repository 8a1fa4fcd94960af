"""Synthetic workloads: reproducible, within their ranges, and validated."""

import random

import pytest

from shardline.workload import make_workload, percentiles


def test_workload_is_seeded_and_within_ranges():
    seed = random.randrange(1 << 30)
    a = make_workload(20, 300, seed=seed, prompt_len=(3, 9), output_len=(2, 5))
    b = make_workload(20, 300, seed=seed, prompt_len=(3, 9), output_len=(2, 5))
    assert a == b
    assert all(3 <= len(p) <= 9 for p in a.prompts)
    assert all(8 <= t < 300 for p in a.prompts for t in p)
    assert all(2 <= n <= 5 for n in a.max_tokens)
    assert a.total_output_tokens == sum(a.max_tokens)


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_prompts=0), "num_prompts"),
    (dict(num_prompts=2, prompt_len=(5, 2)), "prompt_len"),
    (dict(num_prompts=2, output_len=(0, 2)), "output_len"),
])
def test_bad_workload_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_workload(vocab_size=100, **kwargs)


def test_percentiles_of_known_values():
    values = [float(v) for v in range(1, 101)]
    random.shuffle(values)
    p = percentiles(values)
    assert p["p50"] == 50.5 and p["p90"] == 91.0 and p["p99"] == 100.0
    assert percentiles([]) == {}

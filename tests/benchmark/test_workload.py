"""Workloads (synthetic: reproducible, within their ranges, validated; from JSONL files) and
the percentiles runs report."""

import json
import random

import numpy
import pytest

from shardline.benchmark.results import percentiles
from shardline.benchmark.workload import load_jsonl, make_workload


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


def test_percentiles_match_numpy_linear_interpolation(rng):
    """p90/p99 were the value at rank int(q*n) (p90 of ten values was the largest)."""
    for n in (1, 2, 3, 10, rng.randint(4, 500)):
        values = [rng.expovariate(1.0) for _ in range(n)]
        p = percentiles(values)
        for key, q in (("p50", 50), ("p90", 90), ("p99", 99)):
            assert p[key] == pytest.approx(float(numpy.percentile(values, q))), (n, key)
        assert p["mean"] == pytest.approx(float(numpy.mean(values)))
    assert percentiles([]) == {}


def test_jsonl_prompts_text_or_ids_with_default_max_tokens(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "Hello there", "max_tokens": 5}\n\n'
                    '{"prompt": [11, 12, 13]}\n')
    workload = load_jsonl(path, default_max_tokens=9)
    assert workload.prompts == ["Hello there", [11, 12, 13]]
    assert workload.max_tokens == [5, 9]
    assert workload.origins == [f"{path}:1", f"{path}:3"]


@pytest.mark.parametrize("line, match", [
    ("not json", r"prompts.jsonl:2 is not valid JSON"),
    (json.dumps({"prompt": ""}), r'prompts.jsonl:2: "prompt" must be a non-empty string'),
    (json.dumps({"prompt": [1, "x"]}), r'"prompt" must be a non-empty string or list of token'),
    (json.dumps({"prompt": "hi", "max_tokens": 0}), r'"max_tokens"=0 must be an integer >= 1'),
    (json.dumps({"prompt": "hi", "output_len": 9}),
     r"prompts.jsonl:2: unknown key\(s\) \['output_len'\]: a request takes only "
     r"\['max_tokens', 'prompt'\]"),
])
def test_bad_jsonl_lines_are_named(tmp_path, line, match):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "fine"}\n' + line + "\n")
    with pytest.raises(ValueError, match=match):
        load_jsonl(path)


def test_empty_jsonl_is_refused(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n")
    with pytest.raises(ValueError, match="holds no requests"):
        load_jsonl(path)

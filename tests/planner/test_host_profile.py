"""The host-time fit of planner/host_profile.py against step times made from known
constants."""

import random

import pytest

from shardline.planner import host_profile


def test_fit_recovers_the_constants_of_its_points(fresh_seed):
    rng = random.Random(fresh_seed)
    truth = host_profile.HostTimes(step_host_s=rng.uniform(1e-4, 3e-3),
                                   step_host_per_seq_s=rng.uniform(0, 5e-5),
                                   layer_host_s=rng.uniform(1e-4, 1e-3),
                                   layer_host_per_seq_s=rng.uniform(0, 1e-4),
                                   attention_bandwidth=rng.uniform(5e8, 5e9))

    def step_s(layers: int, batch: int, prompt_len: int) -> float:
        return (truth.step_host_s + truth.step_host_per_seq_s * batch
                + layers * (truth.layer_host_s + truth.layer_host_per_seq_s * batch)
                + host_profile.kv_bytes(layers, batch, prompt_len) / truth.attention_bandwidth)

    points = host_profile.points()
    assert len(set(points)) == 5
    fitted = host_profile.fit({p: step_s(*p) for p in points})
    for name, value in truth.__dict__.items():
        assert getattr(fitted, name) == pytest.approx(value, rel=1e-6), name


def test_a_term_that_noise_makes_negative_is_zero():
    # Sixteen sequences a little faster than one: no per-sequence host time.
    def step_s(layers: int, batch: int, prompt_len: int) -> float:
        faster = 1e-5 * (layers + 1) if batch > 1 else 0.0
        return 5e-4 + 1e-3 * layers - faster + host_profile.kv_bytes(layers, batch,
                                                                      prompt_len) / 1e9

    fitted = host_profile.fit({p: step_s(*p) for p in host_profile.points()})
    assert fitted.step_host_per_seq_s == 0 and fitted.layer_host_per_seq_s == 0
    assert fitted.step_host_s == pytest.approx(5e-4)
    assert fitted.layer_host_s == pytest.approx(1e-3)
    assert fitted.attention_bandwidth == pytest.approx(1e9)


def test_a_long_context_no_slower_than_a_short_one_is_refused():
    steps = {p: 1e-3 * p[0] for p in host_profile.points()}
    with pytest.raises(RuntimeError, match="496 cached tokens .* no longer than over 16 .* "
                       "too busy to measure"):
        host_profile.fit(steps)

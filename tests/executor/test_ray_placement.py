"""How the Ray executor reaches its cluster, without starting one."""

from __future__ import annotations

import pytest

from shardline.executor import ray_placement


@pytest.fixture
def ray_init(monkeypatch):
    """The arguments of each ray.init call `connect` makes (none is started)."""
    calls = []
    monkeypatch.setattr(ray_placement.ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray_placement.ray, "init", lambda **kwargs: calls.append(kwargs))
    monkeypatch.setattr(ray_placement.ray, "shutdown", lambda: None)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    yield calls
    while ray_placement._session["users"]:
        ray_placement.disconnect()


def test_no_address_starts_a_cluster_of_its_own(ray_init, rng):
    """With no address and no RAY_ADDRESS, ray.init() joined a cluster already running on
    the machine (`ray start --head`, another engine's), and refused num_cpus there: "When
    connecting to an existing cluster, num_cpus and num_gpus must not be provided"."""
    ranks = rng.randint(1, 64)
    ray_placement.connect(None, ranks)
    assert ray_init == [dict(address="local", num_cpus=max(ray_placement.os.cpu_count(), ranks),
                             include_dashboard=False)]


@pytest.mark.parametrize("given", ["argument", "environment"])
def test_an_address_given_is_joined_as_it_is(ray_init, monkeypatch, given):
    if given == "environment":
        monkeypatch.setenv("RAY_ADDRESS", "10.0.0.7:6379")
    ray_placement.connect("auto" if given == "argument" else None, 4)
    assert ray_init == [dict(address="auto" if given == "argument" else None)]

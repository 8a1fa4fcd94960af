"""The Triton-or-reference choice: read from the environment once, not on every call."""

from collections import UserDict
from types import SimpleNamespace

import torch

from shardline import kernels
from shardline.kernels import dispatch, reference

CUDA, CPU = torch.device("cuda"), torch.device("cpu")


class CountingEnviron(UserDict):
    """A stand-in for os.environ that counts lookups."""

    def __init__(self, values: dict[str, str]):
        super().__init__(values)
        self.reads = 0

    def get(self, key, default=None):
        self.reads += 1
        return super().get(key, default)


def use_environ(monkeypatch, values: dict[str, str]) -> CountingEnviron:
    environ = CountingEnviron(values)
    monkeypatch.setattr(dispatch, "os", SimpleNamespace(environ=environ))
    dispatch.reset_triton_choice()
    return environ


def test_kernel_calls_read_the_environment_once(monkeypatch, fresh_seed):
    environ = use_environ(monkeypatch, {})
    x, w = torch.randn(3, 8), torch.randn(6, 8)
    for _ in range(5):
        assert torch.equal(kernels.linear(x, w), reference.linear(x, w))
        kernels.rms_norm(x, torch.randn(8), 1e-6)
    assert environ.reads == 2
    dispatch.reset_triton_choice()
    kernels.linear(x, w)
    assert environ.reads == 4


def test_choice_holds_until_reset(monkeypatch):
    environ = use_environ(monkeypatch, {"SHARDLINE_FORCE_TRITON": "1"})
    x = torch.zeros(2)
    assert dispatch.use_triton(x) and dispatch.triton_enabled(CPU)
    del environ["SHARDLINE_FORCE_TRITON"]
    assert dispatch.use_triton(x)
    dispatch.reset_triton_choice()
    assert not dispatch.use_triton(x) and not dispatch.triton_enabled(CPU)


def test_disable_wins_on_cuda_and_over_force(monkeypatch):
    environ = use_environ(monkeypatch, {})
    assert dispatch.triton_enabled(CUDA) and not dispatch.triton_enabled(CPU)
    environ.update(SHARDLINE_DISABLE_TRITON="1", SHARDLINE_FORCE_TRITON="1")
    dispatch.reset_triton_choice()
    assert not dispatch.triton_enabled(CUDA) and not dispatch.triton_enabled(CPU)
    assert not dispatch.use_triton(torch.zeros(2))

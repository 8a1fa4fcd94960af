"""What every kernel test shares: the devices to run on, the dtypes each supports, and
a relative-error check that also fails on unwritten (NaN-poisoned) output."""

import pytest
import torch

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))]


def dtypes(device: str) -> list[torch.dtype]:
    """fp32 and fp16 everywhere; bf16 only on CUDA (the interpreter's bf16 math is wrong)."""
    return [torch.float32, torch.float16] + ([torch.bfloat16] if device == "cuda" else [])


def assert_close(actual: torch.Tensor, expected: torch.Tensor,
                 tolerance: dict[torch.dtype, float]) -> None:
    """Max error relative to the largest expected magnitude, under the dtype's threshold."""
    assert not actual.isnan().any(), "unwritten (NaN) elements in the output"
    scale = expected.float().abs().max().clamp_min(1e-6)
    error = (actual.float() - expected.float()).abs().max() / scale
    assert error < tolerance[actual.dtype], f"relative error {error:.2e}"


def force_triton(monkeypatch: pytest.MonkeyPatch, on: bool) -> None:
    """Set or clear SHARDLINE_FORCE_TRITON for this test and make the kernels read it again
    (they read it once per process)."""
    from shardline.kernels.dispatch import reset_triton_choice
    if on:
        monkeypatch.setenv("SHARDLINE_FORCE_TRITON", "1")
    else:
        monkeypatch.delenv("SHARDLINE_FORCE_TRITON", raising=False)
    reset_triton_choice()

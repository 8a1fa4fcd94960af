"""The Triton RMSNorm (with fused residual add) against its torch reference."""

import pytest
import torch

from checks import DEVICES, assert_close, dtypes, force_triton

from shardline import kernels
from shardline.kernels import reference

pytest.importorskip("triton")

from shardline.kernels import norm

pytestmark = pytest.mark.usefixtures("fresh_seed")

TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(7, 96), (3, 5, 50), (1, 1000)])
def test_rms_norm_matches_reference(device, shape):
    for dtype in dtypes(device):
        x = torch.randn(shape, dtype=dtype, device=device) * 3
        weight = torch.randn(shape[-1], dtype=dtype, device=device)
        eps = float(torch.rand(()) * 1e-3)
        out = torch.full_like(x, float("nan"))
        assert norm.rms_norm(x, weight, eps, out=out) is out
        assert_close(out, reference.rms_norm(x, weight, eps), TOLERANCE)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(9, 72), (2, 3, 130)])
def test_rms_norm_with_residual_returns_norm_and_sum(device, shape):
    for dtype in dtypes(device):
        x, residual = (torch.randn(shape, dtype=dtype, device=device) for _ in range(2))
        weight = torch.randn(shape[-1], dtype=dtype, device=device)
        out, summed = torch.full_like(x, float("nan")), torch.full_like(x, float("nan"))
        norm.rms_norm(x, weight, 1e-6, residual, out=out, residual_out=summed)
        expected_out, expected_sum = reference.rms_norm(x, weight, 1e-6, residual)
        assert torch.equal(summed, expected_sum)
        assert_close(out, expected_out, TOLERANCE)


def test_rms_norm_reads_strided_rows():
    x = torch.randn(10, 80)[::3, :64]
    weight = torch.randn(64)
    assert_close(norm.rms_norm(x, weight, 1e-5), reference.rms_norm(x, weight, 1e-5), TOLERANCE)


def test_rms_norm_rejects_mismatched_weight_and_residual():
    x = torch.randn(4, 16)
    with pytest.raises(ValueError, match="weight must be"):
        norm.rms_norm(x, torch.randn(15), 1e-6)
    with pytest.raises(ValueError, match="residual must have the shape"):
        norm.rms_norm(x, torch.randn(16), 1e-6, torch.randn(4, 8))


def test_rms_norm_reads_a_strided_weight():
    x, residual, weight = torch.randn(5, 32), torch.randn(5, 32), torch.randn(96)[::3]
    out, summed = norm.rms_norm(x, weight, 1e-6, residual)
    expected_out, expected_sum = reference.rms_norm(x, weight, 1e-6, residual)
    assert torch.equal(summed, expected_sum)
    assert_close(out, expected_out, TOLERANCE)


def test_rms_norm_refuses_a_residual_or_out_unlike_x():
    x, weight = torch.randn(4, 16), torch.randn(16)
    with pytest.raises(ValueError, match="residual must have x's dtype torch.float32"):
        norm.rms_norm(x, weight, 1e-6, torch.randn(4, 16, dtype=torch.float16))
    with pytest.raises(ValueError, match=r"out must be \[4, 16\] torch.float32"):
        norm.rms_norm(x, weight, 1e-6, out=torch.empty(2, 32))


def test_dispatch_routes_cpu_tensors_to_triton_only_when_forced(monkeypatch):
    monkeypatch.setattr(norm, "rms_norm", lambda *args: "triton rms_norm")
    x, weight = torch.randn(3, 8), torch.randn(8)
    force_triton(monkeypatch, True)
    assert kernels.rms_norm(x, weight, 1e-6) == "triton rms_norm"
    force_triton(monkeypatch, False)
    assert torch.equal(kernels.rms_norm(x, weight, 1e-6), reference.rms_norm(x, weight, 1e-6))


def test_kernel_compiles_for_h100(compile_for_h100):
    io = {name: "*bf16" for name in ("x_ptr", "res_ptr", "w_ptr", "out_ptr", "sum_ptr")}
    compile_for_h100("shardline.kernels.norm", [
        ("_rms_norm_kernel", {**io, "eps": "fp32"}, dict(HAS_RESIDUAL=True, BLOCK=8192)),
    ])

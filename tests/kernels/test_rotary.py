"""The Triton rotary embedding against its torch reference: neox and GPT-J, partial rotary."""

import pytest
import torch

from checks import DEVICES, assert_close, dtypes, force_triton

from shardline import kernels
from shardline.kernels import reference

pytest.importorskip("triton")

from shardline.kernels import rotary

pytestmark = pytest.mark.usefixtures("fresh_seed")

TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def random_cache(positions: int, rot: int, device: str) -> torch.Tensor:
    """An arbitrary [cos | sin] table: the kernel must not assume how it was built."""
    angles = torch.rand(positions, rot // 2, device=device) * 6.3
    return torch.cat((angles.cos(), angles.sin()), dim=-1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("tokens,hq,hk,d,rot", [(5, 4, 2, 16, 16), (3, 6, 3, 24, 12),
                                                (4, 3, 1, 20, 8), (1, 8, 8, 32, 32)])
def test_rotary_matches_reference(device, is_neox, tokens, hq, hk, d, rot):
    for dtype in dtypes(device):
        cache = random_cache(50, rot, device)
        positions = torch.randint(0, 50, (tokens,), device=device)
        q = torch.randn(tokens, hq, d, dtype=dtype, device=device)
        k = torch.randn(tokens, hk, d, dtype=dtype, device=device)
        out = torch.full_like(q, float("nan")), torch.full_like(k, float("nan"))
        rotary.rotary_embedding(positions, q, k, cache, is_neox, out=out)
        expected_q, expected_k = reference.rotary_embedding(positions, q, k, cache, is_neox)
        assert_close(out[0], expected_q, TOLERANCE)
        assert_close(out[1], expected_k, TOLERANCE)
        assert torch.equal(out[0][..., rot:], q[..., rot:])


def test_rotary_reads_views_of_a_fused_qkv():
    tokens, hq, hk, d = 6, 4, 2, 16
    qkv = torch.randn(tokens, (hq + 2 * hk) * d)
    q = qkv[:, :hq * d].view(tokens, hq, d)
    k = qkv[:, hq * d:(hq + hk) * d].view(tokens, hk, d)
    positions = torch.randint(0, 20, (tokens,), dtype=torch.int32)
    cache = random_cache(20, d, "cpu")
    actual = rotary.rotary_embedding(positions, q, k, cache, True)
    expected = reference.rotary_embedding(positions, q, k, cache, True)
    assert_close(actual[0], expected[0], TOLERANCE)
    assert_close(actual[1], expected[1], TOLERANCE)


def test_rotary_rejects_bad_cache_and_shapes():
    positions, q, k = torch.arange(3), torch.randn(3, 2, 8), torch.randn(3, 1, 8)
    with pytest.raises(ValueError, match="cos_sin_cache must be"):
        rotary.rotary_embedding(positions, q, k, torch.randn(10, 12), True)
    with pytest.raises(ValueError, match="k must be"):
        rotary.rotary_embedding(positions, q, torch.randn(2, 1, 8), torch.randn(10, 8), True)


def test_dispatch_routes_cpu_tensors_to_triton_only_when_forced(monkeypatch):
    monkeypatch.setattr(rotary, "rotary_embedding", lambda *args: "triton rotary")
    positions, q, k = torch.arange(3), torch.randn(3, 2, 8), torch.randn(3, 1, 8)
    cache = random_cache(4, 8, "cpu")
    force_triton(monkeypatch, True)
    assert kernels.rotary_embedding(positions, q, k, cache, True) == "triton rotary"
    force_triton(monkeypatch, False)
    actual = kernels.rotary_embedding(positions, q, k, cache, True)
    expected = reference.rotary_embedding(positions, q, k, cache, True)
    assert all(torch.equal(a, e) for a, e in zip(actual, expected))


def test_kernel_compiles_for_h100(compile_for_h100):
    io = {name: "*bf16" for name in ("q_ptr", "k_ptr", "q_out_ptr", "k_out_ptr")}
    io.update(pos_ptr="*i64", cache_ptr="*fp32")
    compile_for_h100("shardline.kernels.rotary", [
        ("_rotary_kernel", io, dict(IS_NEOX=neox, BLOCK_HQ=32, BLOCK_HK=8, BLOCK_HALF=32,
                                    BLOCK_TAIL=0 if neox else 64))
        for neox in (True, False)
    ])


def test_rotary_reads_strided_positions_and_refuses_float_ones():
    tokens, d = 5, 16
    positions = torch.randint(0, 30, (tokens, 2))[:, 1]
    q, k, cache = torch.randn(tokens, 2, d), torch.randn(tokens, 1, d), random_cache(30, d, "cpu")
    actual = rotary.rotary_embedding(positions, q, k, cache, True)
    expected = reference.rotary_embedding(positions, q, k, cache, True)
    assert_close(actual[0], expected[0], TOLERANCE)
    assert_close(actual[1], expected[1], TOLERANCE)
    with pytest.raises(ValueError, match="positions must hold integers; got torch.float32"):
        rotary.rotary_embedding(positions.float(), q, k, cache, True)

"""The fused rotary + KV-cache write against its torch reference (rotate, then write)."""

import pytest
import torch

from checks import DEVICES, assert_close, dtypes, force_triton

from shardline import kernels
from shardline.kernels import reference

pytest.importorskip("triton")

from shardline.kernels import rotary_kv_cache

pytestmark = pytest.mark.usefixtures("fresh_seed")

TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def random_inputs(tokens: int, hq: int, hk: int, d: int, rot: int, dtype: torch.dtype,
                  device: str, num_slots: int) -> dict:
    """Views of one fused qkv projection, an arbitrary [cos | sin] table, and distinct
    slots of which a random third are -1 (padding)."""
    qkv = torch.randn(tokens, (hq + 2 * hk) * d, dtype=dtype, device=device)
    angles = torch.rand(64, rot // 2, device=device) * 6.3
    slots = torch.randperm(num_slots)[:tokens]
    slots[torch.rand(tokens) < 1 / 3] = -1
    return dict(positions=torch.randint(0, 64, (tokens,), device=device),
                q=qkv[:, :hq * d].view(tokens, hq, d),
                k=qkv[:, hq * d:(hq + hk) * d].view(tokens, hk, d),
                v=qkv[:, (hq + hk) * d:].view(tokens, hk, d),
                cos_sin_cache=torch.cat((angles.cos(), angles.sin()), dim=-1),
                slot_mapping=slots.to(device))


def assert_matches_reference(inputs: dict, is_neox: bool, cache_shape: tuple,
                             cache_dtype: torch.dtype) -> None:
    """The rotated q and every cache element (written or not) as the reference leaves them:
    rotated K within the dtype's tolerance, V copied exactly, the rest untouched."""
    device = inputs["q"].device
    caches = [torch.randn(cache_shape, device=device).to(cache_dtype) for _ in range(2)]
    expected_caches = [c.clone() for c in caches]
    q = rotary_kv_cache.rotary_and_write_kv_cache(**inputs, is_neox=is_neox, k_cache=caches[0],
                                                  v_cache=caches[1])
    expected_q = reference.rotary_and_write_kv_cache(**inputs, is_neox=is_neox,
                                                     k_cache=expected_caches[0],
                                                     v_cache=expected_caches[1])
    assert_close(q, expected_q, TOLERANCE)
    written = torch.zeros(cache_shape[0] * cache_shape[1], dtype=torch.bool, device=device)
    slots = inputs["slot_mapping"]
    written[slots[slots >= 0].long()] = True
    k_cache, expected_k = (c.view(-1, *cache_shape[2:]) for c in (caches[0], expected_caches[0]))
    assert torch.equal(k_cache[~written], expected_k[~written])
    if written.any():
        assert_close(k_cache[written], expected_k[written], TOLERANCE)
    assert torch.equal(caches[1], expected_caches[1])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("tokens,hq,hk,d,rot,block_size", [
    (7, 4, 2, 16, 16, 4), (5, 6, 3, 24, 12, 16), (5, 3, 1, 20, 8, 1), (1, 8, 8, 32, 32, 16)])
def test_matches_reference(device, is_neox, tokens, hq, hk, d, rot, block_size):
    num_blocks = 6
    for dtype in dtypes(device):
        inputs = random_inputs(tokens, hq, hk, d, rot, dtype, device, num_blocks * block_size)
        assert_matches_reference(inputs, is_neox, (num_blocks, block_size, hk, d), dtype)


def test_casts_to_the_cache_dtype():
    inputs = random_inputs(6, 4, 2, 16, 16, torch.float32, "cpu", 32)
    assert_matches_reference(inputs, True, (4, 8, 2, 16), torch.float16)


def test_padding_only_rotates_q_and_writes_nothing():
    inputs = random_inputs(4, 4, 2, 16, 16, torch.float32, "cpu", 32)
    inputs["slot_mapping"] = torch.full((4,), -1)
    k_cache, v_cache = torch.randn(4, 8, 2, 16), torch.randn(4, 8, 2, 16)
    before = k_cache.clone(), v_cache.clone()
    q = rotary_kv_cache.rotary_and_write_kv_cache(**inputs, is_neox=True, k_cache=k_cache,
                                                  v_cache=v_cache)
    expected_q, _ = reference.rotary_embedding(inputs["positions"], inputs["q"], inputs["k"],
                                               inputs["cos_sin_cache"], True)
    assert_close(q, expected_q, TOLERANCE)
    assert torch.equal(k_cache, before[0]) and torch.equal(v_cache, before[1])


def test_rejects_mismatched_shapes():
    inputs = random_inputs(3, 4, 2, 16, 16, torch.float32, "cpu", 16)
    k_cache = v_cache = torch.zeros(2, 8, 2, 16)
    with pytest.raises(ValueError, match="slot_mapping must be"):
        rotary_kv_cache.rotary_and_write_kv_cache(
            **{**inputs, "slot_mapping": torch.arange(2)}, is_neox=True, k_cache=k_cache,
            v_cache=v_cache)
    with pytest.raises(ValueError, match="cos_sin_cache must be"):
        rotary_kv_cache.rotary_and_write_kv_cache(
            **{**inputs, "cos_sin_cache": torch.randn(10, 7)}, is_neox=True, k_cache=k_cache,
            v_cache=v_cache)
    with pytest.raises(ValueError, match="k_cache and v_cache must be"):
        rotary_kv_cache.rotary_and_write_kv_cache(
            **inputs, is_neox=True, k_cache=torch.zeros(2, 8, 1, 16), v_cache=v_cache)


def test_dispatch_routes_cpu_tensors_to_triton_only_when_forced(monkeypatch):
    monkeypatch.setattr(rotary_kv_cache, "rotary_and_write_kv_cache", lambda *a: "triton")
    inputs = random_inputs(3, 4, 2, 16, 16, torch.float32, "cpu", 16)
    args = (inputs["positions"], inputs["q"], inputs["k"], inputs["v"],
            inputs["cos_sin_cache"], True)
    force_triton(monkeypatch, True)
    assert kernels.rotary_and_write_kv_cache(*args, torch.zeros(2, 8, 2, 16),
                                             torch.zeros(2, 8, 2, 16),
                                             inputs["slot_mapping"]) == "triton"
    force_triton(monkeypatch, False)
    caches = [torch.zeros(2, 8, 2, 16) for _ in range(4)]
    actual = kernels.rotary_and_write_kv_cache(*args, caches[0], caches[1],
                                               inputs["slot_mapping"])
    expected = reference.rotary_and_write_kv_cache(*args, caches[2], caches[3],
                                                   inputs["slot_mapping"])
    assert torch.equal(actual, expected)
    assert torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])


def test_kernel_compiles_for_h100(compile_for_h100):
    io = {name: "*bf16" for name in ("q_ptr", "k_ptr", "v_ptr", "q_out_ptr", "k_cache_ptr",
                                     "v_cache_ptr")}
    io.update(pos_ptr="*i64", slot_ptr="*i64", cos_sin_ptr="*fp32")
    compile_for_h100("shardline.kernels.rotary_kv_cache", [
        ("_rotary_kv_cache_kernel", io,
         dict(KV_BLOCK_SIZE=16, IS_NEOX=neox, BLOCK_HQ=32, BLOCK_HK=8, BLOCK_HALF=32,
              BLOCK_TAIL=0 if neox else 64, BLOCK_D=128))
        for neox in (True, False)
    ])

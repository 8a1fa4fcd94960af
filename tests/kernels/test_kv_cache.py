"""The Triton KV-cache write (slot mapping, -1 skipped) against its torch reference."""

import pytest
import torch

from checks import DEVICES, dtypes, force_triton

from shardline import kernels
from shardline.kernels import reference

pytest.importorskip("triton")

from shardline.kernels import kv_cache

pytestmark = pytest.mark.usefixtures("fresh_seed")


def random_slots(num_tokens: int, num_slots: int, device: str) -> torch.Tensor:
    """Distinct slots, a random third of them -1 (padding)."""
    slots = torch.randperm(num_slots)[:num_tokens]
    slots[torch.rand(num_tokens) < 1 / 3] = -1
    return slots.to(device)


def assert_writes_like_reference(k, v, cache_shape, cache_dtype, slots) -> None:
    """Every cache element, written or not, equals what the reference leaves there."""
    k_cache = torch.randn(cache_shape, device=k.device).to(cache_dtype)
    v_cache = torch.randn(cache_shape, device=k.device).to(cache_dtype)
    k_expected, v_expected = k_cache.clone(), v_cache.clone()
    reference.write_kv_cache(k, v, k_expected, v_expected, slots)
    kv_cache.write_kv_cache(k, v, k_cache, v_cache, slots)
    assert torch.equal(k_cache, k_expected)
    assert torch.equal(v_cache, v_expected)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("block_size,num_kv_heads,head_dim", [(16, 2, 64), (32, 3, 80),
                                                              (1, 1, 96), (16, 8, 128)])
def test_write_kv_cache_matches_reference(device, block_size, num_kv_heads, head_dim):
    num_blocks = 5
    num_tokens = int(torch.randint(1, num_blocks * block_size + 1, ()))
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    for dtype in dtypes(device):
        k, v = (torch.randn(num_tokens, num_kv_heads, head_dim, dtype=dtype, device=device)
                for _ in range(2))
        slots = random_slots(num_tokens, num_blocks * block_size, device)
        assert_writes_like_reference(k, v, shape, dtype, slots)


@pytest.mark.parametrize("slot_dtype", [torch.int32, torch.int64])
def test_write_kv_cache_reads_a_fused_projection_and_casts_to_the_cache_dtype(slot_dtype):
    num_tokens, num_kv_heads, head_dim = 11, 2, 64
    qkv = torch.randn(num_tokens, (4 + 2 * num_kv_heads) * head_dim)
    k = qkv[:, 4 * head_dim:6 * head_dim].view(num_tokens, num_kv_heads, head_dim)
    v = qkv[:, 6 * head_dim:].view(num_tokens, num_kv_heads, head_dim)
    slots = random_slots(num_tokens, 3 * 16, "cpu").to(slot_dtype)
    assert_writes_like_reference(k, v, (3, 16, num_kv_heads, head_dim), torch.float16, slots)


def test_write_kv_cache_with_only_padding_changes_nothing():
    k = v = torch.randn(4, 1, 64)
    assert_writes_like_reference(k, v, (2, 16, 1, 64), torch.float32,
                                 torch.full((4,), -1, dtype=torch.int64))


def test_write_kv_cache_rejects_a_short_slot_mapping():
    k = v = torch.randn(4, 2, 64)
    cache = torch.zeros(2, 16, 2, 64)
    with pytest.raises(ValueError, match="slot_mapping must be \\[4\\]"):
        kv_cache.write_kv_cache(k, v, cache, cache.clone(), torch.arange(3))


def test_write_kv_cache_refuses_float_slots():
    k = v = torch.randn(4, 2, 64)
    cache = torch.zeros(2, 16, 2, 64)
    with pytest.raises(ValueError, match="slot_mapping must hold integers"):
        kv_cache.write_kv_cache(k, v, cache, cache.clone(), torch.arange(4.0))


def test_dispatch_routes_cpu_tensors_to_triton_only_when_forced(monkeypatch):
    calls = []
    monkeypatch.setattr(kv_cache, "write_kv_cache", lambda *args: calls.append(args))
    k = v = torch.randn(2, 1, 64)
    k_cache, v_cache = torch.zeros(1, 16, 1, 64), torch.zeros(1, 16, 1, 64)
    slots = torch.tensor([3, -1])
    force_triton(monkeypatch, True)
    kernels.write_kv_cache(k, v, k_cache, v_cache, slots)
    assert len(calls) == 1 and not k_cache.any()
    force_triton(monkeypatch, False)
    kernels.write_kv_cache(k, v, k_cache, v_cache, slots)
    assert len(calls) == 1 and torch.equal(k_cache[0, 3], k[0])

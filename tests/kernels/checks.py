"""What every kernel test shares: the devices to run on, the dtypes each supports, a
relative-error check that also fails on unwritten (NaN-poisoned) output, and paged KV
caches poisoned wherever no sequence owns a slot."""

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


def paged_cache(seq_lens: list[int], num_kv_heads: int, head_dim: int, block_size: int,
                dtype: torch.dtype, device: str):
    """Random K/V caches holding each sequence in shuffled blocks, and its block tables.

    Slots no sequence owns hold NaN and unused block-table entries hold -1, so a kernel
    that reads past a sequence's end fails. The decode reference reads (and masks) such
    slots, so its expected values come from a NaN-free copy of the cache.
    """
    needed = [-(-length // block_size) for length in seq_lens]
    num_blocks = sum(needed) + 2
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.full(shape, float("nan"), dtype=dtype, device=device)
    v_cache = torch.full(shape, float("nan"), dtype=dtype, device=device)
    block_tables = torch.full((len(seq_lens), max(needed) + 1), -1, dtype=torch.int32)
    ids = torch.randperm(num_blocks)
    taken = 0
    for b, (length, count) in enumerate(zip(seq_lens, needed)):
        blocks = ids[taken:taken + count]
        taken += count
        block_tables[b, :count] = blocks.int()
        for i, block in enumerate(blocks.tolist()):
            filled = min(block_size, length - i * block_size)
            for cache in (k_cache, v_cache):
                cache[block, :filled] = torch.randn(filled, num_kv_heads, head_dim,
                                                    dtype=dtype, device=device)
    return k_cache, v_cache, block_tables.to(device)

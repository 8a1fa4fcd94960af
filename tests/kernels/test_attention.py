"""The Triton paged attention kernels (decode with split-KV, varlen prefill over a cached
prefix) against their torch references."""

import pytest
import torch

from shardline import kernels
from shardline.kernels import reference

decode = pytest.importorskip("shardline.kernels.attention_decode")
prefill = pytest.importorskip("shardline.kernels.attention_prefill")

pytestmark = pytest.mark.usefixtures("fresh_seed")

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))]
TOLERANCE = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}
# (KV heads, query heads per KV head, head size, cache block size)
LAYOUTS = [(2, 1, 64, 16), (1, 2, 80, 32), (2, 4, 64, 16), (1, 8, 96, 16), (1, 4, 64, 1)]


def dtypes(device: str) -> list[torch.dtype]:
    return [torch.float32, torch.float16] + ([torch.bfloat16] if device == "cuda" else [])


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert not actual.isnan().any(), "unwritten (NaN) elements in the output"
    scale = expected.float().abs().max().clamp_min(1e-6)
    error = (actual.float() - expected.float()).abs().max() / scale
    assert error < TOLERANCE[actual.dtype], f"relative error {error:.2e}"


def paged_cache(seq_lens: list[int], num_kv_heads: int, head_dim: int, block_size: int,
                dtype: torch.dtype, device: str):
    """Random K/V caches holding each sequence in shuffled blocks, and its block tables.

    Slots no sequence owns hold NaN and unused block-table entries hold -1, so a kernel
    that reads past a sequence's end fails.
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


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_decode_matches_reference(device, layout):
    num_kv_heads, group, head_dim, block_size = layout
    lengths = [1, block_size * 2, int(torch.randint(2, 70, ()))]
    seq_lens = torch.tensor(lengths, dtype=torch.int32, device=device)
    scale = head_dim ** -0.5
    for dtype in dtypes(device):
        k_cache, v_cache, block_tables = paged_cache(lengths, num_kv_heads, head_dim,
                                                     block_size, dtype, device)
        q = torch.randn(len(lengths), num_kv_heads * group, head_dim, dtype=dtype,
                        device=device)
        expected = reference.paged_decode_attention(q, k_cache, v_cache, block_tables,
                                                    seq_lens, scale)
        for num_splits in (1, 3):
            out = torch.full_like(q, float("nan"))
            result = decode.paged_decode_attention(q, k_cache, v_cache, block_tables,
                                                   seq_lens, scale, out=out,
                                                   num_splits=num_splits)
            assert result is out
            assert_close(out, expected)


def test_decode_splits_a_long_context_and_reads_strided_queries():
    num_kv_heads, group, head_dim = 1, 4, 64
    lengths = [int(torch.randint(150, 200, ())), 3]
    seq_lens = torch.tensor(lengths, dtype=torch.int32)
    k_cache, v_cache, block_tables = paged_cache(lengths, num_kv_heads, head_dim, 16,
                                                 torch.float32, "cpu")
    fused = torch.randn(2, (group + 2) * num_kv_heads, head_dim)
    q = fused[:, :group * num_kv_heads]
    out = decode.paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, 0.125,
                                        num_splits=7)
    assert_close(out, reference.paged_decode_attention(q, k_cache, v_cache, block_tables,
                                                       seq_lens, 0.125))


def test_decode_of_an_empty_sequence_is_zero():
    k_cache, v_cache, block_tables = paged_cache([5, 1], 1, 64, 16, torch.float32, "cpu")
    q = torch.randn(2, 2, 64)
    seq_lens = torch.tensor([5, 0], dtype=torch.int32)
    for num_splits in (1, 2):
        out = decode.paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, 0.1,
                                            num_splits=num_splits)
        assert torch.equal(out[1], torch.zeros_like(out[1]))


def prefill_inputs(chunks: list[tuple[int, int]], device: str):
    """query_start_loc and seq_lens of sequences given as (cached prefix, new tokens)."""
    q_lens = [new for _, new in chunks]
    starts = torch.tensor([0] + q_lens, dtype=torch.int32).cumsum(0).to(torch.int32)
    seq_lens = torch.tensor([cached + new for cached, new in chunks], dtype=torch.int32)
    return starts.to(device), seq_lens.to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_prefill_matches_reference(device, layout):
    num_kv_heads, group, head_dim, block_size = layout
    chunks = [(0, 1), (0, int(torch.randint(17, 40, ()))), (int(torch.randint(1, 40, ())), 1),
              (int(torch.randint(1, 40, ())), int(torch.randint(2, 35, ()))), (7, 0)]
    query_start_loc, seq_lens = prefill_inputs(chunks, device)
    num_tokens = int(query_start_loc[-1])
    scale = head_dim ** -0.5
    for dtype in dtypes(device):
        k_cache, v_cache, block_tables = paged_cache(seq_lens.tolist(), num_kv_heads,
                                                     head_dim, block_size, dtype, device)
        q = torch.randn(num_tokens, num_kv_heads * group, head_dim, dtype=dtype,
                        device=device)
        out = torch.full_like(q, float("nan"))
        result = prefill.paged_prefill_attention(q, k_cache, v_cache, block_tables,
                                                 query_start_loc, seq_lens, scale, out=out)
        assert result is out
        assert_close(out, reference.paged_prefill_attention(
            q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, scale))


def test_prefill_reads_strided_queries_of_a_fused_projection():
    chunks = [(20, 18), (0, 33)]
    query_start_loc, seq_lens = prefill_inputs(chunks, "cpu")
    k_cache, v_cache, block_tables = paged_cache(seq_lens.tolist(), 2, 64, 16,
                                                 torch.float32, "cpu")
    fused = torch.randn(int(query_start_loc[-1]), 8, 64)
    q = fused[:, :4]
    out = prefill.paged_prefill_attention(q, k_cache, v_cache, block_tables,
                                          query_start_loc, seq_lens, 0.125)
    assert_close(out, reference.paged_prefill_attention(q, k_cache, v_cache, block_tables,
                                                        query_start_loc, seq_lens, 0.125))


def test_attention_rejects_mismatched_heads():
    k_cache = v_cache = torch.zeros(4, 16, 3, 64)
    block_tables = torch.zeros(2, 1, dtype=torch.int32)
    seq_lens = torch.ones(2, dtype=torch.int32)
    with pytest.raises(ValueError, match="multiple of KV heads"):
        decode.paged_decode_attention(torch.randn(2, 4, 64), k_cache, v_cache, block_tables,
                                      seq_lens, 1.0)
    with pytest.raises(ValueError, match="query_start_loc must be"):
        prefill.paged_prefill_attention(torch.randn(2, 6, 64), k_cache, v_cache,
                                        block_tables, torch.tensor([0, 2]), seq_lens, 1.0)


def test_dispatch_routes_cpu_tensors_to_triton_only_when_forced(monkeypatch):
    monkeypatch.setattr(decode, "paged_decode_attention", lambda *args: "triton decode")
    monkeypatch.setattr(prefill, "paged_prefill_attention", lambda *args: "triton prefill")
    k_cache, v_cache, block_tables = paged_cache([3], 1, 64, 16, torch.float32, "cpu")
    q = torch.randn(1, 1, 64)
    seq_lens, starts = torch.tensor([3], dtype=torch.int32), torch.tensor([0, 1])
    monkeypatch.setenv("SHARDLINE_FORCE_TRITON", "1")
    assert kernels.paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens,
                                          1.0) == "triton decode"
    assert kernels.paged_prefill_attention(q, k_cache, v_cache, block_tables, starts,
                                           seq_lens, 1.0) == "triton prefill"
    monkeypatch.delenv("SHARDLINE_FORCE_TRITON")
    out = kernels.paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, 1.0)
    assert_close(out, reference.paged_decode_attention(q, k_cache, v_cache, block_tables,
                                                       seq_lens, 1.0))

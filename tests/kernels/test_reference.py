"""The torch references (the CPU path of the engine) against a naive, unpaged oracle."""

import random

import pytest
import torch

from shardline.kernels import reference

pytestmark = pytest.mark.usefixtures("fresh_seed")


def naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, first_pos: int,
                    scale: float) -> torch.Tensor:
    """q[Tq, Hq, D] at positions first_pos.. over contiguous k, v [L, Hk, D], causal."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    out = torch.empty_like(q)
    for i in range(q.shape[0]):
        seen = first_pos + i + 1
        scores = torch.einsum("hd,khd->hk", q[i], k[:seen]) * scale
        out[i] = torch.einsum("hk,khd->hd", scores.softmax(-1), v[:seen])
    return out


def paged_case(seq_lens: list[int], q_lens: list[int], block_size: int, hk: int, group: int,
               dim: int = 16):
    """Contiguous K/V per sequence, scattered into a paged cache through shuffled blocks."""
    n_blocks = sum(-(-s // block_size) for s in seq_lens) + 3
    k_cache = torch.randn(n_blocks, block_size, hk, dim)
    v_cache = torch.randn(n_blocks, block_size, hk, dim)
    free = random.sample(range(n_blocks), n_blocks)
    max_blocks = max(-(-s // block_size) for s in seq_lens)
    tables = torch.full((len(seq_lens), max_blocks), -1, dtype=torch.int32)
    keys, values = [], []
    for b, length in enumerate(seq_lens):
        k, v = torch.randn(length, hk, dim), torch.randn(length, hk, dim)
        for pos in range(length):
            if pos % block_size == 0:
                tables[b, pos // block_size] = free.pop()
            block = int(tables[b, pos // block_size])
            k_cache[block, pos % block_size], v_cache[block, pos % block_size] = k[pos], v[pos]
        keys.append(k)
        values.append(v)
    q = torch.randn(sum(q_lens), hk * group, dim)
    query_start_loc = torch.tensor([0] + q_lens, dtype=torch.int32).cumsum(0).int()
    return q, k_cache, v_cache, tables, query_start_loc, keys, values


@pytest.mark.parametrize("seq_lens, q_lens", [
    ([7, 13, 1], [7, 13, 1]),           # whole prompts
    ([9, 20, 5, 6], [3, 8, 1, 1]),      # chunks after a cached prefix, and decodes
    ([4, 11], [0, 2]),                  # a sequence with nothing scheduled
])
@pytest.mark.parametrize("block_size, hk, group", [(4, 2, 2), (16, 1, 4), (1, 2, 1)])
def test_prefill_matches_naive_attention(seq_lens, q_lens, block_size, hk, group):
    q, kc, vc, tables, qsl, keys, values = paged_case(seq_lens, q_lens, block_size, hk, group)
    out = reference.paged_prefill_attention(q, kc, vc, tables, qsl, torch.tensor(seq_lens), 0.3)
    for b, (length, q_len) in enumerate(zip(seq_lens, q_lens)):
        start = int(qsl[b])
        expected = naive_attention(q[start:start + q_len], keys[b], values[b], length - q_len, 0.3)
        torch.testing.assert_close(out[start:start + q_len], expected, rtol=1e-5, atol=1e-5)


def test_prefill_chunks_take_torchs_flash_kernel_on_the_cpu():
    """Not the math path, which builds each chunk's whole score matrix: it took about twice
    as long on small-llama's prompts."""
    from torch.profiler import ProfilerActivity, profile
    seq_lens = [random.randint(20, 60), random.randint(2, 19)]
    q_lens = [random.randint(2, seq_lens[0]), seq_lens[1]]   # after a prefix, whole
    q, kc, vc, tables, qsl, _, _ = paged_case(seq_lens, q_lens, 4, 2, 2)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        reference.paged_prefill_attention(q, kc, vc, tables, qsl, torch.tensor(seq_lens), 0.3)
    ran = {event.key for event in prof.key_averages()}
    assert "aten::_scaled_dot_product_attention_math" not in ran, sorted(ran)


@pytest.mark.parametrize("block_size, hk, group", [(4, 2, 2), (16, 1, 8)])
def test_decode_matches_naive_attention(block_size, hk, group):
    seq_lens = [random.randint(1, 40) for _ in range(6)]
    q, kc, vc, tables, _, keys, values = paged_case(seq_lens, [1] * 6, block_size, hk, group)
    out = reference.paged_decode_attention(q, kc, vc, tables, torch.tensor(seq_lens), 0.3)
    for b, length in enumerate(seq_lens):
        expected = naive_attention(q[b:b + 1], keys[b], values[b], length - 1, 0.3)
        torch.testing.assert_close(out[b:b + 1], expected, rtol=1e-5, atol=1e-5)


def test_decode_reads_nothing_outside_each_sequence():
    """Every slot no sequence owns holds NaN (a freed request's leftovers past a reused
    block's end; the blocks that unused table entries name): each output is still the
    naive one. The padded SDPA reads those slots, and masking alone kept their NaN."""
    seq_lens = [random.randint(1, 40) for _ in range(5)]
    q, kc, vc, tables, _, keys, values = paged_case(seq_lens, [1] * 5, 4, 2, 2)
    owned = torch.zeros(kc.shape[:2], dtype=torch.bool)
    for b, length in enumerate(seq_lens):
        for pos in range(length):
            owned[tables[b, pos // 4], pos % 4] = True
    kc[~owned], vc[~owned] = float("nan"), float("nan")
    tables = tables.where(tables >= 0, random.randrange(kc.shape[0]))
    out = reference.paged_decode_attention(q, kc, vc, tables, torch.tensor(seq_lens), 0.3)
    for b, length in enumerate(seq_lens):
        expected = naive_attention(q[b:b + 1], keys[b], values[b], length - 1, 0.3)
        torch.testing.assert_close(out[b:b + 1], expected, rtol=1e-5, atol=1e-5)


def test_decode_of_an_empty_sequence_is_zero():
    q, kc, vc, tables, _, _, _ = paged_case([3, 5], [1, 1], 4, 2, 2)
    out = reference.paged_decode_attention(q, kc, vc, tables, torch.tensor([3, 0]), 0.3)
    assert torch.equal(out[1], torch.zeros_like(out[1])) and out[0].abs().sum() > 0


def test_cache_write_stores_each_slot_and_skips_padding():
    n_blocks, block_size, hk, dim = 8, 4, 2, 8
    slots = random.sample(range(n_blocks * block_size), 6)
    slots[random.randrange(6)] = -1
    k, v = torch.randn(6, hk, dim), torch.randn(6, hk, dim)
    k_cache = torch.zeros(n_blocks, block_size, hk, dim)
    v_cache = torch.zeros_like(k_cache)
    reference.write_kv_cache(k, v, k_cache, v_cache, torch.tensor(slots))
    expected_k, expected_v = torch.zeros_like(k_cache), torch.zeros_like(v_cache)
    for i, slot in enumerate(slots):
        if slot >= 0:
            expected_k[slot // block_size, slot % block_size] = k[i]
            expected_v[slot // block_size, slot % block_size] = v[i]
    assert torch.equal(k_cache, expected_k) and torch.equal(v_cache, expected_v)

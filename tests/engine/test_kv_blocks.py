"""KV block manager: allocation, reference counts, prefix reuse, eviction, no leaks."""

import random

import pytest

from shardline.engine.kv_blocks import KVBlockManager


pytestmark = pytest.mark.usefixtures("seeded_random")


def tokens(n):
    return [random.randrange(1000) for _ in range(n)]


def test_allocate_grows_and_free_returns_everything():
    kv = KVBlockManager(num_blocks=8, block_size=4)
    assert kv.allocate("a", 5) is not None and len(kv.block_table("a")) == 2
    assert len(kv.allocate("a", 9)) == 1
    assert kv.allocate("a", 9) == []
    assert kv.num_free_blocks == 5
    kv.free("a")
    kv.free("a")
    kv.check_invariants()
    assert kv.num_free_blocks == 8


def test_allocate_beyond_free_blocks_changes_nothing():
    kv = KVBlockManager(num_blocks=4, block_size=4)
    kv.allocate("a", 8)
    assert kv.allocate("b", 12) is None
    assert kv.block_table("b") == [] and kv.num_free_blocks == 2
    assert kv.allocate("a", 20) is None
    assert len(kv.block_table("a")) == 2
    kv.check_invariants()


def test_prefix_reuse_shares_blocks_and_keeps_the_last_token_uncached():
    kv = KVBlockManager(num_blocks=16, block_size=4)
    prompt = tokens(12)
    kv.allocate("a", 12)
    kv.cache_computed_blocks("a", prompt, 12)
    assert kv.find_cached_prefix(prompt) == kv.block_table("a")[:2]
    assert kv.find_cached_prefix(prompt + [5]) == kv.block_table("a")
    other = prompt[:4] + [prompt[4] + 1] + prompt[5:]
    assert kv.find_cached_prefix(other) == kv.block_table("a")[:1]
    prefix = kv.find_cached_prefix(prompt + [7, 8])
    kv.allocate("b", 14, prefix)
    assert kv.block_table("b")[:3] == kv.block_table("a")
    assert kv.ref_counts[kv.block_table("a")[0]] == 2
    kv.free("a")
    assert kv.ref_counts[kv.block_table("b")[0]] == 1
    kv.free("b")
    kv.check_invariants()
    assert kv.num_free_blocks == 16


def test_freed_cached_blocks_are_revived_then_evicted_when_needed():
    kv = KVBlockManager(num_blocks=4, block_size=2)
    prompt = tokens(6)
    kv.allocate("a", 6)
    kv.cache_computed_blocks("a", prompt, 6)
    kv.free("a")
    prefix = kv.find_cached_prefix(prompt + [1])
    assert len(prefix) == 3
    assert kv.allocate("b", 7, prefix) is not None
    assert kv.num_free_blocks == 0
    kv.free("b")
    assert kv.allocate("c", 8) is not None
    assert kv.find_cached_prefix(prompt + [1]) == []
    assert not kv.cached
    kv.free("c")
    kv.check_invariants()


def test_only_computed_full_blocks_are_cached():
    kv = KVBlockManager(num_blocks=8, block_size=4)
    prompt = tokens(10)
    kv.allocate("a", 10)
    kv.cache_computed_blocks("a", prompt, 7)
    assert len(kv.cached) == 1
    kv.cache_computed_blocks("a", prompt, 10)
    assert len(kv.cached) == 2
    kv.free("a")
    kv.check_invariants()


def test_prefix_caching_disabled_never_shares():
    kv = KVBlockManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    prompt = tokens(9)
    kv.allocate("a", 9)
    kv.cache_computed_blocks("a", prompt, 9)
    assert kv.find_cached_prefix(prompt) == [] and not kv.cached


def test_attaching_a_prefix_to_a_sequence_with_blocks_is_refused():
    kv = KVBlockManager(num_blocks=8, block_size=4)
    prompt = tokens(8)
    kv.allocate("a", 8)
    kv.cache_computed_blocks("a", prompt, 8)
    kv.allocate("b", 1)
    with pytest.raises(ValueError, match="already has blocks"):
        kv.allocate("b", 9, kv.find_cached_prefix(prompt + [1]))


def test_random_operations_keep_invariants_and_never_leak(fresh_seed):
    rng = random.Random(fresh_seed)
    kv = KVBlockManager(num_blocks=24, block_size=4)
    prefixes = [tokens(rng.randint(4, 20)) for _ in range(3)]
    live: dict[str, list[int]] = {}
    computed: dict[str, int] = {}
    slots = [[None] * 4 for _ in range(24)]  # what a worker would hold in each KV slot
    for step in range(600):
        op = rng.random()
        if op < 0.35 or not live:
            seq = f"s{step}"
            prompt = rng.choice(prefixes)[:rng.randint(1, 20)] + tokens(rng.randint(0, 6))
            if not prompt:
                continue
            prefix = kv.find_cached_prefix(prompt)
            assert len(prefix) * 4 <= len(prompt) - 1
            if kv.allocate(seq, len(prompt), prefix) is not None:
                live[seq], computed[seq] = prompt, len(prefix) * 4
        elif op < 0.7:
            seq = rng.choice(sorted(live))
            done = len(live[seq])
            table = kv.block_table(seq)
            for pos in range(computed[seq], done):
                slots[table[pos // 4]][pos % 4] = live[seq][pos]
            assert [slots[table[p // 4]][p % 4] for p in range(done)] == live[seq]
            kv.cache_computed_blocks(seq, live[seq], done)
            computed[seq] = done
            live[seq].append(rng.randrange(1000))
            if kv.allocate(seq, len(live[seq])) is None:
                kv.free(seq)
                del live[seq]
        else:
            seq = rng.choice(sorted(live))
            kv.free(seq)
            del live[seq]
        kv.check_invariants()
        assert 0 <= kv.num_free_blocks <= kv.num_blocks
        assert all(count >= 0 for count in kv.ref_counts)
        for seq, toks in live.items():
            assert len(kv.block_table(seq)) == kv.blocks_needed(len(toks))
    for seq in list(live):
        kv.free(seq)
    kv.check_invariants()
    assert kv.num_free_blocks == kv.num_blocks

"""Paged KV-cache bookkeeping: which cache blocks each sequence owns, and the prefix cache.

The cache is `num_blocks` fixed-size blocks of `block_size` token slots. A sequence's block
table lists its blocks in token order. A full block whose KV has been computed is keyed by
a hash chained over every token id up to its end, so a later sequence with the same prefix
can reuse it. Blocks are reference counted; a block nobody references sits in the free
queue, and if it is cached it stays reusable until it is evicted to make room (least
recently freed first). The manager only counts and hands out block ids: the KV itself
lives in the workers.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict

_ROOT_HASH = b""


def hash_block(parent_hash: bytes, token_ids: list[int]) -> bytes:
    """Key of a full block: depends on its tokens and on every token before it."""
    return hashlib.sha256(parent_hash + array("q", token_ids).tobytes()).digest()


class KVBlockManager:
    """Allocates blocks to sequences, shares cached prefix blocks, and never leaks."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1:
            raise ValueError(f"num_blocks={num_blocks} is invalid: must be >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[bytes | None] = [None] * num_blocks
        self.cached: dict[bytes, int] = {}
        # Unreferenced blocks, eviction order first; values unused.
        self.free_queue: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        self.tables: dict[str, list[int]] = {}
        # Per sequence: how many leading blocks are hashed, and the last of those hashes.
        self.num_hashed: dict[str, int] = {}
        self.last_hash: dict[str, bytes] = {}

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    def block_table(self, seq_id: str) -> list[int]:
        return self.tables.get(seq_id, [])

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def find_cached_prefix(self, token_ids: list[int]) -> list[int]:
        """Cached blocks holding the longest computed prefix of `token_ids`.

        At most `len(token_ids) - 1` tokens are covered, so the last token is always
        computed again and yields logits.
        """
        if not self.enable_prefix_caching:
            return []
        blocks: list[int] = []
        parent = _ROOT_HASH
        for i in range((len(token_ids) - 1) // self.block_size):
            parent = hash_block(parent, token_ids[i * self.block_size:(i + 1) * self.block_size])
            block = self.cached.get(parent)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def allocate(self, seq_id: str, num_tokens: int, cached_prefix: list[int] | None = None
                 ) -> list[int] | None:
        """Grow the sequence's table to hold `num_tokens` tokens; return the newly added blocks.

        `cached_prefix` (from `find_cached_prefix`, first allocation only) is shared, not
        copied. Returns None and changes nothing when too few blocks are free.
        """
        cached_prefix = cached_prefix or []
        table = self.tables.get(seq_id, [])
        if cached_prefix and table:
            raise ValueError(f"sequence {seq_id!r} already has blocks: a cached prefix can only "
                             "be attached on its first allocation")
        num_new = self.blocks_needed(num_tokens) - len(table) - len(cached_prefix)
        revived = sum(1 for b in cached_prefix if self.ref_counts[b] == 0)
        if max(num_new, 0) + revived > self.num_free_blocks:
            return None
        for block in cached_prefix:
            self._take(block)
        fresh = [self._pop_free() for _ in range(max(num_new, 0))]
        if seq_id not in self.tables:
            self.tables[seq_id] = []
            self.num_hashed[seq_id] = len(cached_prefix)
            self.last_hash[seq_id] = (self.block_hash[cached_prefix[-1]] if cached_prefix
                                      else _ROOT_HASH)
        self.tables[seq_id].extend(cached_prefix + fresh)
        return cached_prefix + fresh

    def cache_computed_blocks(self, seq_id: str, token_ids: list[int], num_computed: int) -> None:
        """Make the sequence's full, computed blocks findable by later sequences."""
        if not self.enable_prefix_caching:
            return
        table = self.tables[seq_id]
        parent = self.last_hash[seq_id]
        num_full = min(num_computed // self.block_size, len(table))
        for i in range(self.num_hashed[seq_id], num_full):
            parent = hash_block(parent, token_ids[i * self.block_size:(i + 1) * self.block_size])
            block = table[i]
            # A block computed twice (two sequences raced on one prefix) keeps the first copy.
            if parent not in self.cached:
                self.cached[parent] = block
                self.block_hash[block] = parent
        self.num_hashed[seq_id] = max(self.num_hashed[seq_id], num_full)
        self.last_hash[seq_id] = parent

    def free(self, seq_id: str) -> None:
        """Release every block of the sequence; unknown ids are ignored (already freed)."""
        table = self.tables.pop(seq_id, None)
        self.num_hashed.pop(seq_id, None)
        self.last_hash.pop(seq_id, None)
        if table is None:
            return
        # Tail blocks first, so a prefix's later blocks are evicted before its earlier ones.
        for block in reversed(table):
            self.ref_counts[block] -= 1
            if self.ref_counts[block] < 0:
                raise RuntimeError(f"block {block} freed more often than allocated")
            if self.ref_counts[block] == 0:
                self.free_queue[block] = None
                if self.block_hash[block] is None:
                    self.free_queue.move_to_end(block, last=False)

    def check_invariants(self) -> None:
        """Raise AssertionError if the accounting is inconsistent (used by tests)."""
        counts = [0] * self.num_blocks
        for table in self.tables.values():
            for block in table:
                counts[block] += 1
        assert counts == self.ref_counts, "reference counts disagree with the block tables"
        free = {b for b in range(self.num_blocks) if counts[b] == 0}
        assert set(self.free_queue) == free, "free queue disagrees with unreferenced blocks"
        for key, block in self.cached.items():
            assert self.block_hash[block] == key, f"cached block {block} lost its hash"
        hashed = [b for b in range(self.num_blocks) if self.block_hash[b] is not None]
        assert len(hashed) == len(self.cached), "a hashed block is missing from the cache map"

    def _take(self, block: int) -> None:
        if self.ref_counts[block] == 0:
            del self.free_queue[block]
        self.ref_counts[block] += 1

    def _pop_free(self) -> int:
        block, _ = self.free_queue.popitem(last=False)
        stale = self.block_hash[block]
        if stale is not None:
            del self.cached[stale]
            self.block_hash[block] = None
        self.ref_counts[block] = 1
        return block

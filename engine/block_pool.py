"""A fixed pool of KV blocks: ref counts, an O(1) LRU free queue, hash -> block.

States of a block:
  free, uncached:  ref_cnt == 0, block_hash is None, in the free queue
  free, cached:    ref_cnt == 0, block_hash set, in the free queue AND in the
                   hash index (reusable until evicted)
  used:            ref_cnt >= 1, not in the free queue (hash may be set)

Invariants (checked by `check_invariants`, exercised by property tests):
  - every block is in exactly one of {free queue, used}; free + used == total
  - ref_cnt >= 0, and ref_cnt == 0 exactly for blocks in the free queue
  - the hash index maps h -> b only if b.block_hash == h
Eviction is least-recently-freed first: a freed block goes to the tail, new
blocks come from the head, and a cached block taken from the head loses its
hash (evicted). Callers free a request's blocks tail-first so its prefix
blocks, the most reusable, stay cached longest.
"""

from __future__ import annotations

from collections.abc import Iterable

from engine.block_hash import BlockHash


class KVBlock:
    """One block of block_size token slots in every layer's K and V cache."""

    __slots__ = ("block_id", "ref_cnt", "block_hash", "prev_free", "next_free")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_cnt = 0
        self.block_hash: BlockHash | None = None
        self.prev_free: KVBlock | None = None
        self.next_free: KVBlock | None = None

    def __repr__(self) -> str:
        return f"KVBlock(id={self.block_id}, ref={self.ref_cnt}, cached={self.block_hash is not None})"


class FreeBlockQueue:
    """Doubly linked list of free blocks: O(1) pop from the head, append, remove anywhere."""

    def __init__(self, blocks: list[KVBlock]) -> None:
        self._head = KVBlock(-1)  # sentinels: no None checks on the hot path
        self._tail = KVBlock(-1)
        self._head.next_free, self._tail.prev_free = self._tail, self._head
        self.size = 0
        for block in blocks:
            self.append(block)

    def popleft(self) -> KVBlock:
        block = self._head.next_free
        if block is self._tail:
            raise IndexError("no free blocks")
        self.remove(block)
        return block

    def append(self, block: KVBlock) -> None:
        last = self._tail.prev_free
        last.next_free, block.prev_free = block, last
        block.next_free, self._tail.prev_free = self._tail, block
        self.size += 1

    def remove(self, block: KVBlock) -> None:
        block.prev_free.next_free = block.next_free
        block.next_free.prev_free = block.prev_free
        block.prev_free = block.next_free = None
        self.size -= 1

    def __iter__(self):
        block = self._head.next_free
        while block is not self._tail:
            yield block
            block = block.next_free


class BlockPool:
    """All KV blocks of one engine. Not thread-safe: the engine loop owns it."""

    def __init__(self, num_blocks: int) -> None:
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        self.free_queue = FreeBlockQueue(self.blocks)
        self.cached: dict[BlockHash, KVBlock] = {}

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        """Blocks that can be handed out now (uncached free plus evictable cached)."""
        return self.free_queue.size

    def get_new_blocks(self, n: int) -> list[KVBlock]:
        """Take n blocks from the head of the free queue (evicting their hashes); ref_cnt = 1."""
        if n > self.free_queue.size:
            raise ValueError(f"asked for {n} blocks, {self.free_queue.size} free")
        out = []
        for _ in range(n):
            block = self.free_queue.popleft()
            self._evict(block)
            block.ref_cnt = 1
            out.append(block)
        return out

    def get_cached_block(self, block_hash: BlockHash) -> KVBlock | None:
        return self.cached.get(block_hash)

    def touch(self, blocks: Iterable[KVBlock]) -> None:
        """Take another reference to blocks found in the cache (free ones leave the free queue)."""
        for block in blocks:
            if block.ref_cnt == 0:
                self.free_queue.remove(block)
            block.ref_cnt += 1

    def free_blocks(self, blocks: Iterable[KVBlock]) -> None:
        """Drop one reference each; blocks reaching 0 join the free queue tail in the given order."""
        for block in blocks:
            if block.ref_cnt <= 0:
                raise RuntimeError(f"double free of {block!r}")
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self.free_queue.append(block)

    def cache_block(self, block: KVBlock, block_hash: BlockHash) -> None:
        """Publish a full, used block under its hash. A hash already published keeps its first block."""
        if block.block_hash is not None or block_hash in self.cached:
            return
        block.block_hash = block_hash
        self.cached[block_hash] = block

    def reset_prefix_cache(self) -> int:
        """Drop every cached hash of free blocks; returns how many were dropped."""
        dropped = 0
        for block in self.free_queue:
            if block.block_hash is not None:
                self._evict(block)
                dropped += 1
        return dropped

    def _evict(self, block: KVBlock) -> None:
        if block.block_hash is not None:
            if self.cached.get(block.block_hash) is block:
                del self.cached[block.block_hash]
            block.block_hash = None

    def check_invariants(self) -> None:
        """Raise AssertionError if any invariant in the module docstring is broken."""
        in_queue = {id(b) for b in self.free_queue}
        assert len(in_queue) == self.free_queue.size, "free queue size drifted"
        for block in self.blocks:
            assert block.ref_cnt >= 0, f"negative ref count: {block!r}"
            assert (block.ref_cnt == 0) == (id(block) in in_queue), f"ref/free mismatch: {block!r}"
        for h, block in self.cached.items():
            assert block.block_hash == h, f"hash index stale for {block!r}"
        used = sum(1 for b in self.blocks if b.ref_cnt > 0)
        assert used + self.free_queue.size == self.num_blocks, "blocks leaked"

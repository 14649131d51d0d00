"""Per-request block allocation on top of the block pool, with prefix-cache lookup.

A request's block_table covers its computed tokens plus the tokens scheduled
this step. Full blocks are published under their hash as soon as they are
allocated for a step: within one packed forward every layer writes all new
K/V before any attention reads it, so a second request scheduled in the same
step may already share them.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.block_pool import BlockPool, KVBlock
from engine.request import Request


@dataclass
class PrefixCacheStats:
    """Counted in tokens, like vLLM's prefix_cache_queries / prefix_cache_hits."""

    queries: int = 0
    hits: int = 0


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool) -> None:
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.pool = BlockPool(num_blocks)
        self.stats = PrefixCacheStats()

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def usage(self) -> float:
        """Fraction of blocks held by requests (0.0 to 1.0)."""
        return 1.0 - self.pool.num_free_blocks / self.pool.num_blocks

    @property
    def largest_free_hole(self) -> int:
        """The most blocks one request can get now: all free ones (any free block serves any sequence)."""
        return self.pool.num_free_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def get_computed_blocks(self, request: Request) -> tuple[list[KVBlock], int]:
        """Longest run of cached full blocks at the start of the request's tokens.

        Returns (blocks, number of tokens they hold). At least one token is
        always left to compute, so the last position's logits exist.
        """
        blocks = self._cached_prefix(request)
        if self.enable_caching:
            self.stats.queries += request.num_tokens
            self.stats.hits += len(blocks) * self.block_size
        return blocks, len(blocks) * self.block_size

    def cached_prefix_tokens(self, request: Request) -> int:
        """What get_computed_blocks would find now, in tokens, without counting a query or holding a block:
        a prediction's estimate (the blocks may be evicted before the request is admitted)."""
        return len(self._cached_prefix(request)) * self.block_size

    def _cached_prefix(self, request: Request) -> list[KVBlock]:
        if not self.enable_caching:
            return []
        blocks = []
        for h in request.full_block_hashes(self.block_size, request.num_tokens - 1):
            block = self.pool.get_cached_block(h)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def allocate_slots(self, request: Request, num_new_tokens: int,
                       computed_blocks: list[KVBlock] | None = None, reserve: int = 0) -> bool:
        """Make room for num_new_tokens more tokens after the computed ones.

        computed_blocks (from get_computed_blocks) are shared first. Returns
        False, changing nothing, when the pool cannot supply enough blocks and
        still keep `reserve` blocks free.
        """
        computed_blocks = computed_blocks or []
        num_computed = request.num_computed_tokens + len(computed_blocks) * self.block_size
        total = num_computed + num_new_tokens
        num_new_blocks = self.blocks_needed(total) - len(request.block_table) - len(computed_blocks)
        # Cached blocks sitting in the free queue stop being free when shared.
        num_evictable = sum(1 for b in computed_blocks if b.ref_cnt == 0)
        if max(num_new_blocks, 0) + num_evictable + reserve > self.pool.num_free_blocks:
            return False
        self.pool.touch(computed_blocks)
        request.block_table.extend(computed_blocks)
        if num_new_blocks > 0:
            request.block_table.extend(self.pool.get_new_blocks(num_new_blocks))
        if self.enable_caching:
            self._cache_full_blocks(request, total)
        return True

    def free(self, request: Request) -> None:
        """Release every block of the request; tail blocks first so prefixes stay cached longest."""
        self.pool.free_blocks(reversed(request.block_table))
        request.block_table = []
        request.num_published_blocks = 0

    def check_invariants(self) -> None:
        self.pool.check_invariants()

    def _cache_full_blocks(self, request: Request, num_tokens: int) -> None:
        hashes = request.full_block_hashes(self.block_size, num_tokens)
        for i in range(request.num_published_blocks, len(hashes)):
            self.pool.cache_block(request.block_table[i], hashes[i])
        request.num_published_blocks = len(hashes)

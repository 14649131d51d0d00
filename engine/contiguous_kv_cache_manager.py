"""Per-request KV for `kv_layout="contiguous"`: one region of consecutive blocks per request.

The same PagedKVCache tensor is the arena; a region is a run of consecutive
block ids (engine/contiguous_allocator.py), so a request's block_table holds
consecutive ids and attention runs unchanged. As for the paged manager, the
block_table covers the computed tokens plus the tokens scheduled this step;
the rest of the region is reserved but unused.

Sizing (EngineConfig.contiguous_reserve):
  - "grow": admission reserves the whole prompt (plus tokens already generated
    by a recomputed request) and the first output token; a region that runs
    out grows by +50% (contiguous_allocator.grown_size): in place if the
    blocks after it are free, else it moves to the first hole that fits, and
    its filled blocks are really copied in the KV tensor (`copy_blocks`,
    timed), else the allocation fails and the scheduler preempts, as paged does.
  - "max": admission reserves prompt + max_tokens (capped by max_model_len);
    the region never grows.
A region is never shared, so prefix caching is off in this layout
(EngineConfig refuses the combination). KVBlock objects here only carry block
ids for block tables; ownership is the allocator's (their ref counts are unused).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from engine.block_pool import KVBlock
from engine.contiguous_allocator import ContiguousAllocator, Growth, Region, Reserve, admission_size, grown_size
from engine.kv_cache_manager import PrefixCacheStats
from engine.request import Request

CopyBlocks = Callable[[list[int], list[int]], None]  # (source block ids, destination block ids)


@dataclass
class MoveStats:
    """Regions moved to a larger hole: how often, how many filled blocks copied, seconds spent copying."""

    moves: int = 0
    blocks_copied: int = 0
    seconds: float = 0.0


class ContiguousKVCacheManager:
    """Drop-in for KVCacheManager (same calls from the scheduler and engine) over contiguous regions."""

    enable_caching = False

    def __init__(self, num_blocks: int, block_size: int, reserve: Reserve, copy_blocks: CopyBlocks) -> None:
        self.block_size = block_size
        self.reserve = reserve
        self.allocator = ContiguousAllocator(num_blocks)
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        self.regions: dict[Request, Region] = {}
        self.stats = PrefixCacheStats()  # stays zero: no prefix caching here
        self.moves = MoveStats()
        self._copy_blocks = copy_blocks

    @property
    def num_blocks(self) -> int:
        return self.allocator.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.allocator.num_free

    @property
    def usage(self) -> float:
        """Fraction of blocks reserved by requests (0.0 to 1.0), used or not."""
        return 1.0 - self.allocator.num_free / self.allocator.num_blocks

    @property
    def largest_free_hole(self) -> int:
        """Blocks in the largest hole: the largest region a new request can get now."""
        return self.allocator.largest_hole()

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def get_computed_blocks(self, request: Request) -> tuple[list[KVBlock], int]:
        """No prefix cache in this layout: nothing is ever computed already."""
        return [], 0

    def cached_prefix_tokens(self, request: Request) -> int:
        """Always 0: this layout shares no cached blocks."""
        return 0

    def allocate_slots(self, request: Request, num_new_tokens: int,
                       computed_blocks: list[KVBlock] | None = None, reserve: int = 0) -> bool:
        """Make the request's region hold num_new_tokens more tokens; False (nothing changed) if it cannot.
        A new region must leave `reserve` blocks free (growing an existing one ignores it)."""
        if computed_blocks:
            raise ValueError("kv_layout='contiguous' cannot share cached blocks")
        need = self.blocks_needed(request.num_computed_tokens + num_new_tokens)
        region = self.regions.get(request)
        if region is None:
            if need == 0:  # a deferred request reserving an (always empty) cached prefix
                return True
            size = self._admission_blocks(request, need)
            region = self.allocator.allocate(size) if size + reserve <= self.allocator.num_free else None
            if region is None:
                return False
            self.regions[request] = region
        elif need > region.length and not self._grow(request, region, need):
            return False
        table = request.block_table
        if len(table) < need:
            table.extend(self.blocks[region.start + len(table): region.start + need])
        return True

    def free(self, request: Request) -> None:
        """Return the request's region to the arena."""
        region = self.regions.pop(request, None)
        if region is not None:
            self.allocator.free(region)
        request.block_table = []
        request.num_published_blocks = 0

    def tokens_reserved(self) -> int:
        """Token slots reserved by live regions (filled or not)."""
        return (self.allocator.num_blocks - self.allocator.num_free) * self.block_size

    def check_invariants(self) -> None:
        """The allocator's invariants, and every block table a prefix of its request's region."""
        self.allocator.check_invariants()
        assert len(self.regions) == self.allocator.num_regions, "region map and allocator disagree"
        for request, region in self.regions.items():
            ids = [b.block_id for b in request.block_table]
            assert ids == list(range(region.start, region.start + len(ids))), f"{request.request_id}: table {ids}"
            assert len(ids) <= region.length

    # ---- internals ----------------------------------------------------------------------------
    def _ceiling(self, request: Request) -> int:
        """Blocks the request can ever use: prompt + max_tokens, capped by max_model_len."""
        tokens = min(request.num_prompt_tokens + request.sampling_params.max_tokens, request.max_total_tokens)
        return self.blocks_needed(tokens)

    def _admission_blocks(self, request: Request, need: int) -> int:
        # "grow" admits with room for every token known now (a recomputed request's
        # outputs included) plus the next one, so the first decode does not regrow at once.
        known = self.blocks_needed(request.num_tokens + 1)
        return max(need, admission_size(known, self._ceiling(request), self.reserve))

    def _grow(self, request: Request, region: Region, need: int) -> bool:
        old_start = region.start
        outcome = self.allocator.grow(region, need, grown_size(region.length, need, self._ceiling(request)))
        if outcome is Growth.MOVED:
            self._move_data(request, old_start, region.start)
        return outcome is not Growth.FAILED

    def _move_data(self, request: Request, old_start: int, new_start: int) -> None:
        """Copy the filled blocks of a moved region and point the block table at the new place."""
        filled = self.blocks_needed(request.num_computed_tokens)
        begin = time.perf_counter()
        if filled:
            self._copy_blocks(list(range(old_start, old_start + filled)), list(range(new_start, new_start + filled)))
        self.moves.seconds += time.perf_counter() - begin
        self.moves.moves += 1
        self.moves.blocks_copied += filled
        request.block_table = self.blocks[new_start: new_start + len(request.block_table)]

"""Contiguous regions over block ids: the KV allocator of the incident (bench/incident.py), built carefully.

A pure data structure (no torch): the engine's `kv_layout="contiguous"` uses
it over its real KV arena, and bench/incident's GPU-scale simulation uses it
over a simulated one, so both measure the same allocator.

The arena is block ids [0, num_blocks). A region is a run [start, start +
length) of consecutive ids owned by one request. Free space is a list of
holes sorted by start.

Invariants (`check_invariants`):
  - holes and regions are disjoint and together cover [0, num_blocks) exactly;
  - holes are coalesced (no two touch) and every hole and region has length >= 1;
  - num_free == the sum of hole lengths.

Placement is first fit over the sorted holes (the lowest-addressed hole that
is large enough): the classic choice, as good as best fit on mixed sizes and
cheaper. `grow` tries, in order:
  1. extend in place into the hole right after the region (up to `target`
     blocks, at least `need`): no copy;
  2. move: release the region (its space joins the holes around it), take the
     first hole of `target` blocks, else of `need` blocks; the caller copies
     the region's data from the old start to the new one, and the two may
     overlap (a read-then-write copy handles it);
  3. fail, changing nothing.

Sizes follow two policies (in blocks, the caller converts from tokens):
  - "grow": admit with room for what is known now, then grow geometrically
    by half the current size (`grown_size`), like a std::vector or realloc
    with amortised O(1) copies per block, capped at the request's ceiling
    (prompt + max_tokens): a region never grows past what it can use.
  - "max": reserve the ceiling at admission and never grow (what servers did
    before paged KV).
"""

from __future__ import annotations

import bisect
import enum
from typing import Literal

Reserve = Literal["grow", "max"]
GROWTH_FRACTION = 0.5  # a growing region gains half its size (at least `need`)


class Region:
    """Consecutive block ids [start, start + length) owned by one request."""

    __slots__ = ("start", "length")

    def __init__(self, start: int, length: int) -> None:
        self.start = start
        self.length = length

    @property
    def end(self) -> int:
        return self.start + self.length

    def __repr__(self) -> str:
        return f"Region(start={self.start}, length={self.length})"


class Growth(enum.Enum):
    IN_PLACE = "in_place"
    MOVED = "moved"
    FAILED = "failed"


def admission_size(known: int, ceiling: int, reserve: Reserve) -> int:
    """Blocks to reserve when a request is admitted: with "grow", `known` (its tokens so far and the
    next one), with "max", its `ceiling` (prompt + max_tokens). All in blocks."""
    return ceiling if reserve == "max" else min(known, ceiling)


def grown_size(current: int, need: int, ceiling: int) -> int:
    """Blocks to grow a `current`-block region to when it needs `need` (> current): +50%, capped at ceiling."""
    return max(need, min(ceiling, current + max(1, int(current * GROWTH_FRACTION))))


class ContiguousAllocator:
    """First-fit contiguous regions in an arena of num_blocks blocks. Not thread-safe."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self._starts: list[int] = [0]  # hole starts, sorted
        self._lengths: dict[int, int] = {0: num_blocks}  # hole start -> length
        self._regions: set[Region] = set()
        self.num_free = num_blocks

    # ---- queries ------------------------------------------------------------------------------
    @property
    def num_regions(self) -> int:
        return len(self._regions)

    def largest_hole(self) -> int:
        """Blocks in the largest hole: the largest region that could be allocated now."""
        return max(self._lengths.values(), default=0)

    def holes(self) -> list[tuple[int, int]]:
        """(start, length) of every hole, by address."""
        return [(s, self._lengths[s]) for s in self._starts]

    # ---- operations ---------------------------------------------------------------------------
    def allocate(self, length: int) -> Region | None:
        """A new region of `length` blocks at the first hole that fits, or None (nothing changes)."""
        start = self._first_fit(length)
        if start is None:
            return None
        self._carve(start, length)
        region = Region(start, length)
        self._regions.add(region)
        return region

    def free(self, region: Region) -> None:
        """Return a region's blocks to the holes, merging with its neighbours."""
        if region not in self._regions:
            raise ValueError(f"{region!r} is not allocated here (double free?)")
        self._regions.remove(region)
        self._release(region.start, region.length)

    def grow(self, region: Region, need: int, target: int) -> Growth:
        """Make `region` at least `need` blocks long (aiming for `target` >= need); see the module docstring.

        On MOVED, region.start is the new start; the caller must copy the data
        that was at the old start. On FAILED, nothing changed.
        """
        if region not in self._regions:
            raise ValueError(f"{region!r} is not allocated here")
        if need <= region.length:
            return Growth.IN_PLACE
        target = max(target, need)
        after = self._lengths.get(region.end, 0)
        if region.length + after >= need:
            extra = min(target, region.length + after) - region.length
            self._carve(region.end, extra)
            region.length += extra
            return Growth.IN_PLACE
        old_start, old_length = region.start, region.length
        self._release(old_start, old_length)
        for size in (target, need):
            start = self._first_fit(size)
            if start is not None:
                self._carve(start, size)
                region.start, region.length = start, size
                return Growth.MOVED
        self._carve(old_start, old_length)  # no room anywhere: put it back exactly as it was
        return Growth.FAILED

    # ---- internals ----------------------------------------------------------------------------
    def _first_fit(self, length: int) -> int | None:
        for start in self._starts:
            if self._lengths[start] >= length:
                return start
        return None

    def _carve(self, start: int, length: int) -> None:
        """Take [start, start + length) out of the hole that contains it (it must be free)."""
        i = bisect.bisect_right(self._starts, start) - 1
        hole = self._starts[i] if i >= 0 else -1
        hole_end = hole + self._lengths.get(hole, 0)
        if i < 0 or start + length > hole_end:
            raise RuntimeError(f"blocks [{start}, {start + length}) are not free")
        del self._starts[i], self._lengths[hole]
        if start > hole:
            self._add_hole(hole, start - hole)
        if start + length < hole_end:
            self._add_hole(start + length, hole_end - start - length)
        self.num_free -= length

    def _release(self, start: int, length: int) -> None:
        """Add [start, start + length) to the holes, coalescing with the holes on either side."""
        self.num_free += length
        i = bisect.bisect_left(self._starts, start)
        if i < len(self._starts) and self._starts[i] == start + length:  # the hole right after
            length += self._lengths.pop(self._starts.pop(i))
        if i > 0 and self._starts[i - 1] + self._lengths[self._starts[i - 1]] == start:  # the hole right before
            start = self._starts.pop(i - 1)
            length += self._lengths.pop(start)
        self._add_hole(start, length)

    def _add_hole(self, start: int, length: int) -> None:
        bisect.insort(self._starts, start)
        self._lengths[start] = length

    def check_invariants(self) -> None:
        """Raise AssertionError if an invariant in the module docstring is broken."""
        spans = sorted([(s, n, "hole") for s, n in self.holes()] + [(r.start, r.length, "region") for r in
                                                                       self._regions])
        position = 0
        previous = None
        for start, length, kind in spans:
            assert length >= 1, f"empty {kind} at {start}"
            assert start == position, f"gap or overlap at block {position} (next {kind} starts at {start})"
            assert not (kind == previous == "hole"), f"uncoalesced holes at {start}"
            position, previous = start + length, kind
        assert position == self.num_blocks, f"spans cover {position} of {self.num_blocks} blocks"
        assert self.num_free == sum(self._lengths.values()), "num_free drifted"
        assert self._starts == sorted(self._lengths), "hole index drifted"

"""PrefixIndex: this worker's copy of which block hashes the cluster prefix directory holds.

The directory is one actor; asking it on every request would put one actor's call rate on the whole
cluster's request path. Instead each prefill worker follows the directory's change feed (one long-poll
call per worker at a time, whatever the request rate) and answers "how much of this prompt is there?"
from local memory. The directory is then contacted only to fetch blocks the index says it holds.

Invariants: the index reflects the directory's state at (epoch, seq), the last delta applied; a delta
from another epoch (the directory restarted, or this index fell behind the directory's bounded log)
arrives with reset=True and replaces the whole set. The index may lag the directory by one poll: a hash
it lists may have been evicted since (the fetch then returns a shorter run, counted as stale), and a
hash just published may not be listed yet (the worker computes that block; nothing wrong is served).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class IndexDelta:
    """The directory's changes since a follower's (epoch, seq): the net presence of each hash that changed.

    reset: the follower's epoch or position is unknown to the directory, so `added` is the full set and the
    follower drops everything it had first. Hashes are in no particular order."""

    epoch: str
    seq: int
    reset: bool
    added: tuple[bytes, ...] = ()
    removed: tuple[bytes, ...] = ()


class PrefixIndex:
    """A set of block hashes with the (epoch, seq) of the directory state it mirrors."""

    def __init__(self) -> None:
        self.epoch = ""  # the directory's epoch this mirrors; "" before the first delta
        self.seq = 0
        self._hashes: set[bytes] = set()

    def __len__(self) -> int:
        return len(self._hashes)

    def __contains__(self, block_hash: bytes) -> bool:
        return block_hash in self._hashes

    def leading_run(self, hashes: list[bytes]) -> int:
        """How many of hashes, from the first, the directory is believed to hold (a block is useless
        without its whole prefix, so the run stops at the first gap)."""
        n = 0
        while n < len(hashes) and hashes[n] in self._hashes:
            n += 1
        return n

    def apply(self, delta: IndexDelta) -> None:
        """Mirror the directory at delta.seq. A non-reset delta for another epoch is dropped: it answers a
        poll sent before this index was cleared, and only a reset delta can refill a cleared index."""
        if not delta.reset and delta.epoch != self.epoch:
            return
        if delta.reset:
            self._hashes = set(delta.added)
        else:
            self._hashes.update(delta.added)
        self._hashes.difference_update(delta.removed)
        self.epoch, self.seq = delta.epoch, delta.seq

    def note_published(self, hashes: list[bytes]) -> None:
        """This worker's publish returned: the directory holds these now (the feed will say so too)."""
        self._hashes.update(hashes)

    def clear(self) -> None:
        """The directory is unreachable: believe it holds nothing (compute instead of a failing fetch), and
        ask it for a full state when it is back."""
        self._hashes.clear()
        self.epoch, self.seq = "", 0

"""The cluster-wide prefix cache: block hash -> that block's K/V (all layers) in Ray's object store.

Runs as one named Ray actor. Prefill workers send it newly computed blocks
and it `ray.put`s each one itself, so the directory owns the object and a
block outlives the worker that computed it (Ray 2.56 removed `_owner=`).
Bounded in bytes with LRU eviction; pinned entries (each product's system
prompt) are never evicted.

Invariants: bytes_used == sum of entry sizes; bytes used by unpinned entries
never exceeds capacity after a publish returns; a hash maps to at most one
entry, and a lookup returns only a leading run of the hashes asked for
(a block is useless without its whole prefix).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import ray

DIRECTORY_NAME = "pdserve-prefix-directory"
NAMESPACE = "pdserve"


@dataclass
class _Entry:
    ref: ray.ObjectRef
    nbytes: int
    pinned: bool


@dataclass(frozen=True)
class DirectoryStats:
    entries: int
    pinned_entries: int
    bytes_used: int
    capacity_bytes: int
    lookups: int
    blocks_hit: int
    blocks_published: int
    evictions: int


class PrefixDirectory:
    def __init__(self, capacity_bytes: int = 1 << 30) -> None:
        self.capacity_bytes = capacity_bytes
        self._entries: OrderedDict[bytes, _Entry] = OrderedDict()
        self._bytes_used = 0
        self._lookups = self._hits = self._published = self._evictions = 0

    def lookup(self, hashes: list[bytes]) -> list[ray.ObjectRef]:
        """Refs of the longest leading run of hashes the directory holds (marks them recently used)."""
        self._lookups += 1
        refs = []
        for h in hashes:
            entry = self._entries.get(h)
            if entry is None:
                break
            self._entries.move_to_end(h)
            refs.append(entry.ref)
        self._hits += len(refs)
        return refs

    def contains(self, hashes: list[bytes]) -> int:
        """Length of the leading run of hashes held, without touching LRU order."""
        n = 0
        while n < len(hashes) and hashes[n] in self._entries:
            n += 1
        return n

    def publish(self, hashes: list[bytes], blocks: np.ndarray, pinned: bool = False) -> int:
        """Add blocks: blocks[:, :, i] is the K/V of hashes[i] ([num_layers, 2, n, block_size, Hkv, D]).

        Known hashes are kept (and pinned if asked). Returns how many were new.
        """
        added = 0
        for i, h in enumerate(hashes):
            entry = self._entries.get(h)
            if entry is not None:
                entry.pinned = entry.pinned or pinned
                self._entries.move_to_end(h)
                continue
            block = np.ascontiguousarray(blocks[:, :, i:i + 1])
            self._entries[h] = _Entry(ray.put(block), block.nbytes, pinned)
            self._bytes_used += block.nbytes
            added += 1
        self._published += added
        self._evict()
        return added

    def pin(self, hashes: list[bytes]) -> int:
        """Pin held entries (a product's system prompt); returns how many of hashes are pinned."""
        n = 0
        for h in hashes:
            entry = self._entries.get(h)
            if entry is not None:
                entry.pinned = True
                n += 1
        return n

    def unpin_all(self) -> None:
        for entry in self._entries.values():
            entry.pinned = False
        self._evict()

    def clear(self, keep_pinned: bool = True) -> int:
        """Drop entries (all, or all but pinned); returns how many were dropped."""
        drop = [h for h, e in self._entries.items() if not (keep_pinned and e.pinned)]
        for h in drop:
            self._bytes_used -= self._entries.pop(h).nbytes
        return len(drop)

    def stats(self) -> DirectoryStats:
        return DirectoryStats(
            entries=len(self._entries), pinned_entries=sum(e.pinned for e in self._entries.values()),
            bytes_used=self._bytes_used, capacity_bytes=self.capacity_bytes, lookups=self._lookups,
            blocks_hit=self._hits, blocks_published=self._published, evictions=self._evictions,
        )

    def ready(self) -> bool:
        return True

    def _evict(self) -> None:
        unpinned = sum(e.nbytes for e in self._entries.values() if not e.pinned)
        for h in list(self._entries):
            if unpinned <= self.capacity_bytes:
                break
            entry = self._entries[h]
            if entry.pinned:
                continue
            del self._entries[h]
            self._bytes_used -= entry.nbytes
            unpinned -= entry.nbytes
            self._evictions += 1


def get_or_create_directory(capacity_bytes: int = 1 << 30) -> ray.actor.ActorHandle:
    """The cluster's directory actor (detached from its creator, named, one per namespace)."""
    actor = ray.remote(num_cpus=0, max_restarts=-1)(PrefixDirectory)
    return actor.options(name=DIRECTORY_NAME, namespace=NAMESPACE, get_if_exists=True,
                         lifetime="detached").remote(capacity_bytes)

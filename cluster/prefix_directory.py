"""The cluster-wide prefix cache: block hash -> that block's K/V (all layers) in Ray's object store.

Runs as one named Ray actor. Prefill workers send it newly computed blocks
and it `ray.put`s each one itself, so the directory owns the object and a
block outlives the worker that computed it (Ray 2.56 removed `_owner=`).
Bounded in bytes with LRU eviction; pinned entries (each product's system
prompt) are never evicted.

It is not asked on the request path whether it holds a prompt's blocks:
every prefill worker follows its change feed (`changes`, one long poll per
worker at a time) into a local PrefixIndex and calls `lookup` only for
blocks that index says are here. The feed is a bounded log of per-hash
events, numbered by `seq` within an `epoch` (a fresh one each time the actor
starts, so a restarted directory tells its followers to start over).

Invariants: bytes_used == sum of entry sizes; bytes used by unpinned entries
never exceeds capacity after a publish returns; a hash maps to at most one
entry, and a lookup returns only a leading run of the hashes asked for
(a block is useless without its whole prefix); every change to the set of
held hashes is one event in the log, so a follower that applies the deltas
in order holds exactly the directory's set at the delta's seq.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import OrderedDict, deque
from dataclasses import dataclass

import numpy as np
import ray

from prefill_workers.prefix_index import IndexDelta

DIRECTORY_NAME = "pdserve-prefix-directory"
NAMESPACE = "pdserve"
# Per-hash events kept for followers; one further behind gets the whole set instead (a reset delta).
LOG_EVENTS = 1 << 16


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
    publish_calls: int = 0
    contains_calls: int = 0
    change_polls: int = 0


class PrefixDirectory:
    """Methods are coroutines so that the actor is an async one: every call runs on its one event loop,
    and a follower's long poll waits there without holding a thread."""

    def __init__(self, capacity_bytes: int = 1 << 30, log_events: int = LOG_EVENTS) -> None:
        """capacity_bytes: the budget of unpinned entries; log_events: per-hash changes kept for followers."""
        self.capacity_bytes = capacity_bytes
        self._entries: OrderedDict[bytes, _Entry] = OrderedDict()
        self._bytes_used = 0
        self._lookups = self._hits = self._published = self._evictions = 0
        self._publish_calls = self._contains_calls = self._polls = 0
        self.epoch = uuid.uuid4().hex  # new on every (re)start: followers' positions mean nothing here
        self._seq = 0  # events so far; the log holds the last LOG_EVENTS of them
        self._log: deque[tuple[int, bytes, bool]] = deque(maxlen=log_events)  # (seq, hash, held after it)
        self._changed: asyncio.Event | None = None  # set, then replaced, whenever an event is logged

    async def lookup(self, hashes: list[bytes]) -> list[ray.ObjectRef]:
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

    async def contains(self, hashes: list[bytes]) -> int:
        """Length of the leading run of hashes held, without touching LRU order."""
        self._contains_calls += 1
        n = 0
        while n < len(hashes) and hashes[n] in self._entries:
            n += 1
        return n

    async def publish(self, hashes: list[bytes], blocks: np.ndarray, pinned: bool = False) -> int:
        """Add blocks: blocks[:, :, i] is the K/V of hashes[i] ([num_layers, 2, n, block_size, Hkv, D]).

        Known hashes are kept (and pinned if asked). Returns how many were new.
        """
        self._publish_calls += 1
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
            self._log_event(h, True)
            added += 1
        self._published += added
        self._evict()
        return added

    async def pin(self, hashes: list[bytes]) -> int:
        """Pin held entries (a product's system prompt); returns how many of hashes are pinned."""
        n = 0
        for h in hashes:
            entry = self._entries.get(h)
            if entry is not None:
                entry.pinned = True
                n += 1
        return n

    async def unpin_all(self) -> None:
        for entry in self._entries.values():
            entry.pinned = False
        self._evict()

    async def clear(self, keep_pinned: bool = True) -> int:
        """Drop entries (all, or all but pinned); returns how many were dropped."""
        drop = [h for h, e in self._entries.items() if not (keep_pinned and e.pinned)]
        for h in drop:
            self._drop(h)
        return len(drop)

    async def changes(self, epoch: str, seq: int, timeout_s: float = 0.0) -> IndexDelta:
        """What changed since a follower's (epoch, seq): waits up to timeout_s seconds for a first change
        when there is none yet (a long poll), then answers at once, empty if nothing changed."""
        self._polls += 1
        if epoch == self.epoch and seq == self._seq and timeout_s > 0:
            if self._changed is None:
                self._changed = asyncio.Event()
            try:
                await asyncio.wait_for(self._changed.wait(), timeout_s)
            except TimeoutError:
                pass
        return self._delta_since(epoch, seq)

    async def stats(self) -> DirectoryStats:
        return DirectoryStats(
            entries=len(self._entries), pinned_entries=sum(e.pinned for e in self._entries.values()),
            bytes_used=self._bytes_used, capacity_bytes=self.capacity_bytes, lookups=self._lookups,
            blocks_hit=self._hits, blocks_published=self._published, evictions=self._evictions,
            publish_calls=self._publish_calls, contains_calls=self._contains_calls, change_polls=self._polls,
        )

    async def ready(self) -> bool:
        return True

    def _delta_since(self, epoch: str, seq: int) -> IndexDelta:
        oldest_known = self._log[0][0] - 1 if self._log else self._seq  # the earliest seq the log can serve
        if epoch != self.epoch or not oldest_known <= seq <= self._seq:
            return IndexDelta(self.epoch, self._seq, reset=True, added=tuple(self._entries))
        latest: dict[bytes, bool] = {}
        for event_seq, h, held in reversed(self._log):
            if event_seq <= seq:
                break
            latest.setdefault(h, held)
        return IndexDelta(self.epoch, self._seq, reset=False,
                          added=tuple(h for h, held in latest.items() if held),
                          removed=tuple(h for h, held in latest.items() if not held))

    def _log_event(self, h: bytes, held: bool) -> None:
        self._seq += 1
        self._log.append((self._seq, h, held))
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    def _drop(self, h: bytes) -> None:
        self._bytes_used -= self._entries.pop(h).nbytes
        self._log_event(h, False)

    def _evict(self) -> None:
        unpinned = sum(e.nbytes for e in self._entries.values() if not e.pinned)
        for h in list(self._entries):
            if unpinned <= self.capacity_bytes:
                break
            entry = self._entries[h]
            if entry.pinned:
                continue
            self._drop(h)
            unpinned -= entry.nbytes
            self._evictions += 1


def get_or_create_directory(capacity_bytes: int = 1 << 30) -> ray.actor.ActorHandle:
    """The cluster's directory actor (detached from its creator, named, one per namespace)."""
    actor = ray.remote(num_cpus=0, max_restarts=-1)(PrefixDirectory)
    return actor.options(name=DIRECTORY_NAME, namespace=NAMESPACE, get_if_exists=True,
                         lifetime="detached").remote(capacity_bytes)

"""DirectoryClient: a prefill worker's side of the cluster prefix directory.

The directory is an optimisation: a slow, dead or restarting one costs recompute, never a request. What
the client does:
- follows the directory's change feed into a local PrefixIndex (one long poll at a time, off the request
  path), so "does the cluster hold this prefix?" is a local read;
- fetches blocks only when the index says the directory holds them (one `lookup` call, then the objects);
- offers blocks the index says the directory lacks, then re-pins what this worker pinned if the
  directory lost it (a restart).

Invariants: no directory call on the request path unless the index lists at least one wanted block;
every failed call is counted and forgets the handle (found again by name, at most once per
DIRECTORY_RETRY_S, since the actor may have restarted) and empties the index (nothing is fetched from a
directory that is not answering); a fetch that returns fewer blocks than the index promised counts the
missing ones as stale and the worker computes them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

import numpy as np
import ray

from prefill_workers.prefix_index import PrefixIndex

log = logging.getLogger(__name__)

# A fetch the index promised may cost a request at most this much TTFT before the worker computes the
# blocks itself (seconds; a healthy lookup takes milliseconds).
DIRECTORY_LOOKUP_TIMEOUT_S = 1.0
DIRECTORY_PUBLISH_TIMEOUT_S = 10.0  # in the background, after the request: bounds the tasks a hang leaves
DIRECTORY_RETRY_S = 1.0  # after a failure, how long before the directory's handle is looked up again
FEED_POLL_S = 10.0  # the change feed's long poll: how long the directory holds a call with nothing new
FEED_MARGIN_S = 5.0  # past the poll, how long before the call counts as failed


class DirectoryClient:
    def __init__(self, directory: str | ray.actor.ActorHandle, namespace: str = "pdserve") -> None:
        """directory: the actor's name (looked up, and again after a failure) or its handle."""
        self._ref = directory
        self._namespace = namespace
        self._handle = None if isinstance(directory, str) else directory
        self._retry_at = 0.0  # monotonic seconds: no new lookup before (a GCS outage costs one per period)
        self.index = PrefixIndex()
        self._synced = asyncio.Event()  # the index has mirrored the directory at least once
        self._waited = False  # a first request already waited for that (later ones never wait)
        self._feed: asyncio.Task | None = None
        self.fetched = self.published = self.errors = self.stale = self.lookups = 0
        self.pinned: set[bytes] = set()  # hashes this worker warmed: re-pinned if the directory restarts

    # ---- the change feed -----------------------------------------------------------------------------
    def follow(self) -> None:
        """Start (or restart, if it ended) following the change feed; needs a running event loop."""
        if self._feed is None or self._feed.done():
            self._feed = asyncio.ensure_future(self._follow())

    async def synced(self) -> bool:
        """Whether the index has mirrored the directory; the first call waits up to
        DIRECTORY_LOOKUP_TIMEOUT_S seconds for it, so a new worker's first request fetches what the
        cluster holds instead of computing it, and an unreachable directory delays one request, not
        every one."""
        self.follow()
        if self._waited or self._synced.is_set():
            return self._synced.is_set()
        self._waited = True
        try:
            await asyncio.wait_for(self._synced.wait(), DIRECTORY_LOOKUP_TIMEOUT_S)
        except TimeoutError:
            return False
        return True

    async def _follow(self) -> None:
        while True:
            handle = self.handle()
            if handle is None:
                await asyncio.sleep(max(0.05, self._retry_at - time.monotonic()))
                continue
            try:
                delta = await asyncio.wait_for(
                    handle.changes.remote(self.index.epoch, self.index.seq, FEED_POLL_S),
                    FEED_POLL_S + FEED_MARGIN_S)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.failed(exc, "change feed failed")
                await asyncio.sleep(DIRECTORY_RETRY_S)  # a handle that keeps failing must not spin
                continue
            self.index.apply(delta)
            self._synced.set()

    # ---- fetch and offer ------------------------------------------------------------------------------
    async def fetch(self, hashes: list[bytes]) -> list[np.ndarray]:
        """The directory's blocks for the longest run of hashes it holds, from the first; [] when the index
        lists none of them (no call) or the fetch failed (counted)."""
        promised = self.index.leading_run(hashes)
        handle = self.handle() if promised else None
        if handle is None:
            return []
        self.lookups += 1
        try:
            arrays = await asyncio.wait_for(self._lookup(handle, hashes[:promised]), DIRECTORY_LOOKUP_TIMEOUT_S)
        except Exception as exc:
            self.failed(exc, "fetch failed, computing instead")
            return []
        self.stale += promised - len(arrays)
        return arrays

    @staticmethod
    async def _lookup(handle, hashes: list[bytes]) -> list[np.ndarray]:
        refs = await handle.lookup.remote(hashes)
        return list(await asyncio.gather(*refs)) if refs else []

    async def offer(self, hashes: list[bytes],
                    read_blocks: Callable[[list[bytes]], Awaitable[np.ndarray]]) -> None:
        """Offer a run of a prompt's full blocks (from its first): the directory gets the ones the index
        says it lacks, read by read_blocks (which may return fewer, a leading run: evicted locally since).
        Bounded by DIRECTORY_PUBLISH_TIMEOUT_S; a failure is counted."""
        known = self.index.leading_run(hashes)
        handle = self.handle() if known < len(hashes) else None
        if handle is None:
            return
        try:
            await asyncio.wait_for(self._offer(handle, hashes[known:], read_blocks), DIRECTORY_PUBLISH_TIMEOUT_S)
        except Exception as exc:
            self.failed(exc, "publish failed")

    async def _offer(self, handle, hashes: list[bytes],
                     read_blocks: Callable[[list[bytes]], Awaitable[np.ndarray]]) -> None:
        blocks = await read_blocks(hashes)
        n = blocks.shape[2]
        if not n:
            return
        await handle.publish.remote(hashes[:n], blocks, False)
        self.published += n
        self.index.note_published(hashes[:n])
        repin = [h for h in hashes[:n] if h in self.pinned]
        if repin:  # the directory restarted and lost its pins
            await handle.pin.remote(repin)

    async def pin(self, hashes: list[bytes]) -> int:
        """Pin a warmed prompt's blocks (kept through restarts by re-pinning on offer); how many are held."""
        handle = self.handle()
        self.pinned.update(hashes)
        if handle is None:
            return 0
        await handle.pin.remote(hashes)
        return await handle.contains.remote(hashes)

    # ---- the handle ----------------------------------------------------------------------------------
    def handle(self):
        """The directory's handle, or None while it is unreachable (then looked up again, by name, at most
        once per DIRECTORY_RETRY_S)."""
        if self._handle is None and isinstance(self._ref, str) and time.monotonic() >= self._retry_at:
            try:
                self._handle = ray.get_actor(self._ref, namespace=self._namespace)
            except ValueError:  # not running (yet, or restarting): serve without it for a while
                self._retry_at = time.monotonic() + DIRECTORY_RETRY_S
        return self._handle

    def failed(self, exc: BaseException, what: str) -> None:
        """Count a failed directory call, forget the handle (when it was looked up by name) and the index:
        the directory may have restarted empty, and is asked again for everything once it answers."""
        self.errors += 1
        if isinstance(self._ref, str):
            self._handle = None
        self._retry_at = time.monotonic() + DIRECTORY_RETRY_S
        self.index.clear()
        log.warning("prefix directory %s: %r", what, exc)

    def close(self) -> None:
        if self._feed is not None:
            self._feed.cancel()

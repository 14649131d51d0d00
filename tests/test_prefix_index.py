"""The cluster prefix directory's change feed and the prefill worker's local index of it.

The index lets a worker answer "does the cluster hold this prefix?" without a call; these tests pin down
that the index mirrors the directory exactly (deltas, resets, a restarted or overrun directory), that a
worker asks the directory only for blocks its index lists, and that a listed block the directory evicted
meanwhile is computed, counted, and never served.
"""

from __future__ import annotations

import asyncio

import numpy as np
import ray

from engine.config import SamplingParams
from engine.tiny_model import path as model_path
from prefill_workers.prefix_index import IndexDelta, PrefixIndex
from prefill_workers.protocol import PrefillRequest
from prefill_workers.server import PrefillServer
from tests.cluster_helpers import TIMEOUT_S
from tests.engine_helpers import hf_greedy, random_prompts

GREEDY = SamplingParams(temperature=0.0, max_tokens=1)
H = [bytes([i]) * 8 for i in range(8)]


def test_index_mirrors_resets_and_deltas() -> None:
    index = PrefixIndex()
    index.apply(IndexDelta("e1", 3, reset=True, added=(H[0], H[1], H[2])))
    assert index.leading_run(H) == 3 and (index.epoch, index.seq) == ("e1", 3)
    index.apply(IndexDelta("e1", 5, reset=False, added=(H[3],), removed=(H[1],)))
    assert index.leading_run(H) == 1  # the run stops at the gap a removal leaves
    assert H[3] in index and H[1] not in index
    index.apply(IndexDelta("e2", 1, reset=True, added=(H[5],)))  # the directory restarted: start over
    assert len(index) == 1 and index.leading_run([H[5], H[0]]) == 1


def test_cleared_index_ignores_a_delta_answering_an_older_poll() -> None:
    """A poll sent before the index was cleared must not refill it partially: only a reset can."""
    index = PrefixIndex()
    index.apply(IndexDelta("e1", 2, reset=True, added=(H[0], H[1])))
    index.clear()
    index.apply(IndexDelta("e1", 3, reset=False, added=(H[2],)))
    assert len(index) == 0 and index.epoch == ""
    index.apply(IndexDelta("e1", 3, reset=True, added=(H[0], H[1], H[2])))
    assert index.leading_run(H) == 3


def _block(n: int = 1) -> np.ndarray:
    return np.zeros((1, 2, n, 4, 1, 2), dtype=np.float32)  # [layers, K/V, n, block_size, Hkv, D]


def _directory(**kwargs):
    from cluster.prefix_directory import PrefixDirectory

    handle = ray.remote(num_cpus=0)(PrefixDirectory).remote(**kwargs)
    ray.get(handle.ready.remote(), timeout=TIMEOUT_S)
    return handle


def test_feed_wakes_a_long_poll_and_reports_evictions(ray_local) -> None:
    block_bytes = _block().nbytes
    directory = _directory(capacity_bytes=2 * block_bytes)
    try:
        first = ray.get(directory.changes.remote("", 0, 0.0), timeout=TIMEOUT_S)
        assert first.reset and first.added == ()
        poll = directory.changes.remote(first.epoch, first.seq, 600.0)  # held until something changes
        ray.get(directory.publish.remote([H[0], H[1]], _block(2)), timeout=TIMEOUT_S)
        woken = ray.get(poll, timeout=TIMEOUT_S)  # long before the poll's 600 s
        assert not woken.reset and set(woken.added) == {H[0], H[1]} and woken.removed == ()
        ray.get(directory.publish.remote([H[2]], _block(1)), timeout=TIMEOUT_S)  # over budget: H[0] evicted
        delta = ray.get(directory.changes.remote(woken.epoch, woken.seq, 0.0), timeout=TIMEOUT_S)
        assert delta.added == (H[2],) and delta.removed == (H[0],)
        index = PrefixIndex()
        for d in (first, woken, delta):
            index.apply(d)
        assert {h for h in H if h in index} == {H[1], H[2]}
        assert ray.get(directory.contains.remote([H[1], H[2]]), timeout=TIMEOUT_S) == 2
    finally:
        ray.kill(directory)


def test_feed_resets_a_follower_it_cannot_serve(ray_local) -> None:
    """Another epoch (a restarted directory) or a position older than the bounded log gets the whole set."""
    directory = _directory(log_events=2)
    try:
        start = ray.get(directory.changes.remote("", 0, 0.0), timeout=TIMEOUT_S)
        ray.get(directory.publish.remote(H[:3], _block(3)), timeout=TIMEOUT_S)  # 3 events, 2 kept
        behind = ray.get(directory.changes.remote(start.epoch, start.seq, 0.0), timeout=TIMEOUT_S)
        assert behind.reset and set(behind.added) == set(H[:3])
        other = ray.get(directory.changes.remote("another-epoch", behind.seq, 0.0), timeout=TIMEOUT_S)
        assert other.reset and set(other.added) == set(H[:3])
        current = ray.get(directory.changes.remote(behind.epoch, behind.seq, 0.0), timeout=TIMEOUT_S)
        assert not current.reset and current.added == () and current.removed == ()
    finally:
        ray.kill(directory)


class _EvictedDirectory:
    """A directory whose feed lists a prompt's blocks and whose lookup finds none: evicted in between."""

    def __init__(self, hashes: list[bytes]) -> None:
        self.lookups = 0
        listing = IndexDelta("e", 1, reset=True, added=tuple(hashes))

        async def changes(epoch: str, seq: int, timeout_s: float) -> IndexDelta:
            if epoch == "e":  # already told: hold the poll like a quiet directory
                await asyncio.sleep(3600)
            return listing

        async def lookup(_hashes: list[bytes]) -> list:
            self.lookups += 1
            return []

        async def publish(hashes: list[bytes], _blocks, _pinned: bool) -> int:
            return len(hashes)

        self.changes, self.lookup, self.publish = _Call(changes), _Call(lookup), _Call(publish)


class _Call:
    """`.remote(...)` returning an awaitable, as a Ray actor handle's method does."""

    def __init__(self, fn) -> None:
        self.remote = fn


def test_listed_but_evicted_blocks_are_computed_and_counted() -> None:
    """In one process, no Ray: the index promises the prompt's blocks, the fetch returns none; the worker
    computes them (the right first token) and counts each as stale. One lookup call, no more."""
    prompt = random_prompts([90], 8192, seed=51)[0]
    plain = PrefillServer(None, {"transport": "local"}, None)
    indexed = None
    try:
        async def run():
            nonlocal indexed
            reference = await plain.prefill(PrefillRequest("plain", prompt, GREEDY))
            plain.connector.release(reference.kv.export_id)
            evicted = _EvictedDirectory(list(reference.kv.block_hashes))
            indexed = PrefillServer(None, {"transport": "local"}, evicted)
            result = await indexed.prefill(PrefillRequest("stale", prompt, GREEDY))
            indexed.connector.release(result.kv.export_id)
            return reference, result, await indexed.stats(), evicted.lookups

        reference, result, stats, lookups = asyncio.run(run())
        promised = (len(prompt) - 1) // indexed.block_size
        assert result.first_token == reference.first_token == hf_greedy(model_path("tiny"), prompt, 1)[0][0]
        assert result.num_computed_tokens == len(prompt) and result.num_cached_tokens == 0
        assert stats.directory_stale_blocks == promised and stats.directory_lookups == lookups == 1
        assert stats.directory_blocks_fetched == 0 and stats.directory_index_entries == len(reference.kv.block_hashes)
    finally:
        plain.shutdown(timeout_s=5)
        if indexed is not None:
            indexed.shutdown(timeout_s=5)

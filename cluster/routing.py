"""Replica choice for the worker deployments (Ray Serve request routers).

Prefill: prefer the replica that last served the longest prefix of this
prompt (its pool holds those blocks: no directory fetch, no compute), unless
that replica's queue is `imbalance` requests longer than the least loaded
one; then, and when no prefix matches, fall back to the least loaded.
A prefill replica's `release_kv(export_id, owner)` goes to the replica
named `owner` (its worker id, the Serve replica id): only that one holds the
export, and a release sent elsewhere would leave it to its lease.
Decode: the shortest queue among the replicas with KV headroom (at least a
quarter of their KV free, reported through `record_routing_stats`), then the
replicas short of KV; ties go to the most free blocks. Replicas the request
names in `avoid_workers` (their engines refused it for load, and the ingress
tries it again: cluster/stream_migration.py) come after all others. Queue length leads
because the router keeps it exact (Serve counts each request sent and done),
while KV reports are up to a period old: ranking on free blocks first sent a
whole burst to the one replica that reported a block more (measured: five
streams on one of two idle replicas).

Both return ranked lists; Serve probes the ranks in order and skips full replicas.
Both take FIFOMixin: without it (Serve 2.60) a router only hands a chosen replica to the
exact request it was chosen for, and concurrent requests from one handle stalled (measured:
two parallel streams from the ingress, the second never sent).
"""

from __future__ import annotations

from collections import OrderedDict

from ray.serve.request_router import (
    FIFOMixin,
    PendingRequest,
    ReplicaID,
    ReplicaResult,
    RequestRouter,
    RunningReplica,
)

from engine.block_hash import extra_keys, hash_full_blocks

ROUTING_BLOCK = 16  # tokens per routing hash; independent of the engines' block size
# Prompts hashed for routing and not yet routed (cancelled while Serve chose a replica leaves one behind):
# the oldest beyond this many are forgotten.
MAX_HASHED_PENDING = 256


def _queue_len(router: RequestRouter, replica: RunningReplica) -> int:
    """The router's cached queue length of a replica (0 when unknown: Serve probes it when sending)."""
    # Serve 2.60 has no public accessor; Ray Serve LLM's own PrefixCacheAffinityRouter reads the same attribute.
    cache = getattr(router, "_replica_queue_len_cache", None)
    cached = cache.get(replica.replica_id) if cache is not None else None
    return cached if cached is not None else 0


def _ranks(*ranks: list[RunningReplica]) -> list[list[RunningReplica]]:
    """Serve probes ranks in order; an empty rank must not appear."""
    return [rank for rank in ranks if rank]


def _prefill_request(pending: PendingRequest | None):
    if pending is None or not pending.args:
        return None
    request = pending.args[0]
    return request if hasattr(request, "prompt_token_ids") else None


def _worker_id(replica: RunningReplica) -> str:
    """The worker id a replica's engine worker goes by (the Serve replica's full id)."""
    return replica.replica_id.to_full_id_str()


def _avoided_workers(pending: PendingRequest | None) -> frozenset[str]:
    """The worker ids a decode request asks to be sent elsewhere than (its avoid_workers), else none."""
    request = pending.args[0] if pending is not None and pending.args else None
    return frozenset(request.get("avoid_workers") or ()) if isinstance(request, dict) else frozenset()


def _release_owner(pending: PendingRequest | None) -> str | None:
    """The owner argument of a release_kv(export_id, owner) call, else None."""
    metadata = getattr(pending, "metadata", None)
    if getattr(metadata, "call_method", None) != "release_kv" or len(pending.args) < 2:
        return None
    return pending.args[1]


class PrefixAffinityRouter(FIFOMixin, RequestRouter):
    """Longest-prefix affinity with a load-imbalance escape hatch."""

    def initialize_state(self, imbalance: int = 4, max_entries: int = 200_000) -> None:
        self._imbalance = imbalance
        self._max_entries = max_entries
        self._owner: OrderedDict[bytes, ReplicaID] = OrderedDict()  # prefix hash -> replica that computed it
        # id(pending) -> (pending, its prompt's hashes) until it is routed; holding the request keeps its id its own
        self._hashed: OrderedDict[int, tuple[PendingRequest, list[bytes]]] = OrderedDict()

    def _hashes(self, pending: PendingRequest | None) -> list[bytes]:
        """A prefill request's routing hashes, computed once per request: choosing (again, when Serve
        retries) and on_request_routed read the same list."""
        request = _prefill_request(pending)
        if request is None:
            return []
        known = self._hashed.get(id(pending))
        if known is not None:
            return known[1]
        hashes = hash_full_blocks(request.prompt_token_ids, ROUTING_BLOCK, extra_keys("", request.cache_salt))
        self._hashed[id(pending)] = (pending, hashes)
        while len(self._hashed) > MAX_HASHED_PENDING:
            self._hashed.popitem(last=False)
        return hashes

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        by_load = sorted(candidate_replicas, key=lambda r: _queue_len(self, r))
        if not by_load:
            return []
        owner = _release_owner(pending_request)
        if owner is not None:  # a gone owner took its exports with it: any replica answers the no-op
            return _ranks([r for r in by_load if _worker_id(r) == owner]) or _ranks(by_load[:1])
        by_id = {r.replica_id: r for r in candidate_replicas}
        for h in reversed(self._hashes(pending_request)):  # longest prefix first
            owner = by_id.get(self._owner.get(h))
            if owner is not None:
                if _queue_len(self, owner) - _queue_len(self, by_load[0]) <= self._imbalance:
                    return _ranks([owner], [r for r in by_load if r is not owner])
                break
        return _ranks(by_load[:1], by_load[1:])

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID,
                          result: ReplicaResult) -> None:
        hashes = self._hashes(pending_request)
        self._hashed.pop(id(pending_request), None)
        for h in hashes:
            self._owner[h] = replica_id
            self._owner.move_to_end(h)
        while len(self._owner) > self._max_entries:
            self._owner.popitem(last=False)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        for h in [h for h, r in self._owner.items() if r == replica_id]:
            del self._owner[h]


class KVHeadroomRouter(FIFOMixin, RequestRouter):
    """Least loaded among the replicas with KV headroom, then the ones short of KV."""

    def initialize_state(self, low_water: float = 0.25) -> None:
        self._low_water = low_water  # free KV fraction below which a replica is short of KV

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        avoid = _avoided_workers(pending_request)

        def key(r: RunningReplica) -> tuple[bool, bool, int, float]:
            stats = r.routing_stats or {}
            usage = stats.get("kv_usage")  # unknown: a new replica, roomy
            short_of_kv = usage is not None and 1.0 - float(usage) < self._low_water
            avoided = bool(avoid) and _worker_id(r) in avoid
            return avoided, short_of_kv, _queue_len(self, r), -float(stats.get("kv_free_blocks", 0))

        keyed = sorted(((key(r), r) for r in candidate_replicas), key=lambda kr: kr[0])
        refused = [r for k, r in keyed if k[0]]
        short = [r for k, r in keyed if not k[0] and k[1]]
        roomy = [r for k, r in keyed if not k[0] and not k[1]]
        return _ranks(roomy[:1], roomy[1:], short, refused)

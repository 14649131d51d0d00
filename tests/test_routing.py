"""Replica choice: prefill prefers the replica holding the longest prefix unless it is overloaded;
decode prefers KV headroom. The routers are driven directly with stand-in replicas."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from ray.serve._private.common import DeploymentHandleSource, DeploymentID, RequestMetadata
from ray.serve.request_router import PendingRequest, ReplicaID

from cluster import routing
from cluster.routing import KVHeadroomRouter, PrefixAffinityRouter
from engine.block_hash import extra_keys, hash_full_blocks
from engine.config import SamplingParams
from prefill_workers.protocol import PrefillRequest


@dataclass
class FakeReplica:
    replica_id: str
    routing_stats: dict = field(default_factory=dict)


def _router(cls):
    # as Serve builds it for a handle outside Ray Client: the queue-length cache counts sends
    router = cls(DeploymentID(name="d", app_name="a"), DeploymentHandleSource.UNKNOWN,
                 use_replica_queue_len_cache=True)
    router.initialize_state()
    return router


def _pending(tokens: list[int], salt: str = "p") -> PendingRequest:
    request = PrefillRequest("r", tokens, SamplingParams(), salt)
    return PendingRequest(args=[request], kwargs={}, metadata=None)


def _choose(router, replicas, pending=None):
    return asyncio.run(router.choose_replicas(replicas, pending))


def test_prefill_follows_the_longest_prefix_then_balances() -> None:
    asyncio.run(_prefill_affinity())


async def _prefill_affinity() -> None:
    router = _router(PrefixAffinityRouter)
    choose = router.choose_replicas
    a, b, c = FakeReplica("a"), FakeReplica("b"), FakeReplica("c")
    system = list(range(100, 324))  # 14 routing blocks
    router.on_request_routed(_pending(system + [1] * 40), "b", None)
    router.on_request_routed(_pending(system[:64]), "c", None)
    ranks = await choose([a, b, c], _pending(system + [2] * 30))
    assert ranks[0] == [b]  # b holds the whole system prompt, c only its first 4 blocks
    assert (await choose([a, b, c], _pending(system[:40])))[0] in ([b], [c])
    other_salt = await choose([a, b, c], _pending(system + [2] * 30, salt="other"))
    assert other_salt[0] == [a] and sum(len(r) for r in other_salt) == 3  # no affinity across salts
    router._replica_queue_len_cache.update("b", 10)  # b is overloaded: fall back to the least loaded
    router._replica_queue_len_cache.update("a", 0)
    router._replica_queue_len_cache.update("c", 3)
    assert (await choose([a, b, c], _pending(system + [2] * 30)))[0] == [a]
    assert all(rank for rank in await choose([a], None))  # never an empty rank


def test_a_prompt_is_hashed_once_per_request() -> None:
    """Choosing (twice here, as when Serve retries) and recording the route share one hashing of the prompt
    (the same list each time); the routed request's hashes are then forgotten."""

    async def route() -> list[list[FakeReplica]]:
        router = _router(PrefixAffinityRouter)
        a, b = FakeReplica("a"), FakeReplica("b")
        pending = _pending(list(range(100, 180)))
        await router.choose_replicas([a, b], pending)
        first = router._hashed[id(pending)][1]
        assert first == hash_full_blocks(list(range(100, 180)), routing.ROUTING_BLOCK, extra_keys("", "p"))
        await router.choose_replicas([a, b], pending)
        assert len(router._hashed) == 1 and router._hashed[id(pending)][1] is first  # not hashed again
        router.on_request_routed(pending, "b", None)
        assert not router._hashed
        return await router.choose_replicas([a, b], _pending(list(range(100, 180))))

    assert asyncio.run(route())[0][0].replica_id == "b"  # a new request with the same prompt follows the owner


def test_a_release_goes_to_the_replica_that_holds_the_export() -> None:
    asyncio.run(_release_routing())


async def _release_routing() -> None:
    router = _router(PrefixAffinityRouter)
    deployment = DeploymentID(name="d", app_name="a")
    a, b, c = (FakeReplica(ReplicaID(unique_id=n, deployment_id=deployment)) for n in "abc")
    router._replica_queue_len_cache.update(b.replica_id, 9)  # the owner is the busiest: still the one

    def release(owner: str) -> PendingRequest:
        metadata = RequestMetadata(request_id="x", internal_request_id="y", call_method="release_kv")
        return PendingRequest(args=["export-1", owner], kwargs={}, metadata=metadata)

    assert await router.choose_replicas([a, b, c], release(b.replica_id.to_full_id_str())) == [[b]]
    gone = await router.choose_replicas([a, b, c], release("d#gone"))  # its exports went with it: anyone
    assert len(gone) == 1 and len(gone[0]) == 1


def test_decode_prefers_kv_headroom_then_the_shortest_queue() -> None:
    router = _router(KVHeadroomRouter)
    short = FakeReplica("short", {"kv_free_blocks": 30, "kv_usage": 0.9})
    roomy = FakeReplica("roomy", {"kv_free_blocks": 900, "kv_usage": 0.1})
    unknown = FakeReplica("new")
    router._replica_queue_len_cache.update("roomy", 3)
    ranks = _choose(router, [short, unknown, roomy])
    # a new replica (no report yet) counts as roomy; the one short of KV comes last whatever its queue
    assert [[r.replica_id for r in rank] for rank in ranks] == [["new"], ["roomy"], ["short"]]
    router._replica_queue_len_cache.update("new", 3)
    assert _choose(router, [short, unknown, roomy])[0] == [roomy]  # equal queues: the most free blocks
    assert _choose(router, []) == []


def test_decode_ranks_the_replicas_that_refused_a_request_last() -> None:
    asyncio.run(_decode_avoids_refusers())


async def _decode_avoids_refusers() -> None:
    router = _router(KVHeadroomRouter)
    ids = {name: ReplicaID(name, DeploymentID(name="d", app_name="a")) for name in "abc"}
    idle, busy, short = (FakeReplica(ids["a"], {"kv_usage": 0.0}), FakeReplica(ids["b"], {"kv_usage": 0.0}),
                         FakeReplica(ids["c"], {"kv_usage": 0.9}))
    router._replica_queue_len_cache.update(ids["b"], 5)
    request = {"prompt_token_ids": [1, 2], "avoid_workers": [ids["a"].to_full_id_str()]}
    pending = PendingRequest(args=[request], kwargs={}, metadata=None)
    assert await router.choose_replicas([idle, busy, short]) == [[idle], [busy], [short]]
    assert await router.choose_replicas([idle, busy, short], pending) == [[busy], [short], [idle]]  # refuser last
    assert await router.choose_replicas([idle], pending) == [[idle]]  # still a choice when it is the only one


def test_decode_spreads_a_burst_between_kv_reports() -> None:
    """Routing stats are up to a period old: a burst must follow the queue lengths the router keeps
    exact, not pile onto the replica that last reported a few more free blocks."""
    router = _router(KVHeadroomRouter)
    ids = {name: ReplicaID(name, DeploymentID(name="d", app_name="a")) for name in "ab"}
    a = FakeReplica(ids["a"], {"kv_free_blocks": 501, "kv_usage": 0.0})
    b = FakeReplica(ids["b"], {"kv_free_blocks": 500, "kv_usage": 0.0})
    chosen = []
    for _ in range(6):
        replica = _choose(router, [a, b])[0][0]
        router.on_send_request(replica.replica_id)  # what Serve does as it sends the request
        chosen.append(replica.replica_id.unique_id)
    assert sorted(chosen) == ["a", "a", "a", "b", "b", "b"], chosen

"""Cluster-wide idle invariants, checked from what the workers report to the metrics hub.

When no client request is in flight, a healthy pdserve cluster holds:
- no running or waiting request on any live worker;
- no sample counted in flight and no token-stream queue open on any ingress
  replica (a client that left must not keep either raised);
- every KV block free on every live worker (prefix-cached blocks count as
  free: they are in the free queue, evictable);
- no KV export alive on any prefill worker (every lease fetched, released
  or reaped);
- in the prefix directory, unpinned entries within its byte budget.

Workers report every ~1 s, so `wait_cluster_idle` polls until the
invariants hold or a deadline passes, then reports what still does not.
Sources that stopped reporting (a killed replica) are not live and are
skipped: their blocks died with them.
"""

from __future__ import annotations

import time

import ray

from cluster.metric_names import (
    INGRESS_INFLIGHT,
    KV_BLOCKS_USED,
    KV_EXPORTS_ALIVE,
    NUM_REQUESTS_RUNNING,
    NUM_REQUESTS_WAITING,
    ROLE_DECODE,
    ROLE_INGRESS,
    ROLE_PREFILL,
    TOKEN_STREAMS_OPEN,
)
from cluster.metrics_hub import SourceInfo

_MUST_BE_ZERO = (NUM_REQUESTS_RUNNING, NUM_REQUESTS_WAITING, KV_BLOCKS_USED, KV_EXPORTS_ALIVE, INGRESS_INFLIGHT,
                 TOKEN_STREAMS_OPEN)
ALL_ROLES = (ROLE_INGRESS, ROLE_PREFILL, ROLE_DECODE)


def source_violations(sources: list[SourceInfo], roles: tuple[str, ...] = ALL_ROLES) -> list[str]:
    """What breaks the idle invariants among live worker sources (empty when idle)."""
    problems = []
    for src in sources:
        if not src.live or src.role not in roles:
            continue
        for name in _MUST_BE_ZERO:
            value = src.gauges.get(name, 0.0)
            if value:
                problems.append(f"{src.source_id} ({src.product}): {name} = {value:g}")
    return problems


def directory_violations(stats) -> list[str]:
    """The directory's unpinned entries must fit its budget (pinned ones may exceed it by design).

    stats: a cluster.prefix_directory.DirectoryStats; unpinned bytes are not reported directly, so
    the check is bytes_used minus an upper bound of pinned bytes (entries are equal-sized blocks).
    """
    if stats.entries == 0:
        return []
    per_entry = stats.bytes_used / stats.entries
    unpinned_bytes = (stats.entries - stats.pinned_entries) * per_entry
    if unpinned_bytes > stats.capacity_bytes:
        return [f"prefix directory: {unpinned_bytes:.0f} unpinned bytes over its {stats.capacity_bytes} budget"]
    return []


def wait_cluster_idle(hub, directory=None, timeout_s: float = 30.0, poll_s: float = 0.5,
                      roles: tuple[str, ...] = ALL_ROLES, products: tuple[str, ...] | None = None
                      ) -> list[str]:
    """Poll until the idle invariants hold (returns []) or timeout_s passes (returns the violations).

    hub, directory: actor handles (directory may be None). products: only check sources of these
    products (None: all). timeout_s=0 takes one look.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        sources = ray.get(hub.sources.remote(), timeout=max(timeout_s, 30.0))
        if products is not None:
            sources = [s for s in sources if s.product in products]
        problems = source_violations(sources, roles)
        if directory is not None:
            problems += directory_violations(ray.get(directory.stats.remote(), timeout=max(timeout_s, 30.0)))
        if not problems or time.monotonic() >= deadline:
            return problems
        time.sleep(poll_s)

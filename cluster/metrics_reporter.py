"""Pushing a replica's metrics to the hub: a MetricsReporter per replica, one push every period_s.

Invariants: pushes from one reporter never overlap (a late push must not overwrite a newer snapshot);
nothing here raises into the replica: a missing or restarting hub only costs missed pushes, counted in
pushes_failed and warned about once per outage; the hub is found by name (metrics_hub.HUB_NAME in
metrics_hub.NAMESPACE) and looked up again after any failure. Times in seconds.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable, Mapping

import ray

from cluster.metric_snapshots import MetricsSnapshot
from cluster.metrics_hub import HUB_NAME, NAMESPACE, get_hub
from prefill_workers.remote_calls import awaited

log = logging.getLogger(__name__)

_Snapshots = MetricsSnapshot | Mapping[str, MetricsSnapshot]
Collect = Callable[[], Awaitable[_Snapshots] | _Snapshots]


class MetricsReporter:
    """Pushes a replica's snapshot to the hub every period_s from an asyncio task.

    collect() returns (or awaits to) a MetricsSnapshot for `product`, or a mapping product -> snapshot
    (an ingress that serves several products). The hub is looked up by name lazily and again after any
    failure, so a hub that is missing or restarting only costs missed pushes; nothing here raises into
    the replica. Counters: pushes_ok, pushes_failed.
    """

    def __init__(self, source_id: str, role: str, product: str, collect: Collect, period_s: float = 1.0, *,
                 hub_name: str = HUB_NAME, namespace: str = NAMESPACE, timeout_s: float = 5.0) -> None:
        self.source_id, self.role, self.product = source_id, role, product
        self.period_s = period_s
        self.timeout_s = timeout_s
        self._collect = collect
        self._hub_name, self._namespace = hub_name, namespace
        self._hub: ray.actor.ActorHandle | None = None
        self._task: asyncio.Task | None = None
        self._lock: asyncio.Lock | None = None
        self.pushes_ok = self.pushes_failed = 0
        self._failing = False

    def start(self) -> None:
        """Start the push loop on the running event loop (idempotent). Call it from a coroutine or from
        code running on the replica's event loop: it raises RuntimeError when no loop is running."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._loop(), name=f"metrics-{self.source_id}")

    async def flush(self) -> bool:
        """Push the current snapshot now; True if the hub took it."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:  # one push at a time: a late push must not overwrite a newer one
            try:
                snapshots = await self._snapshots()
                hub = self._hub or await asyncio.to_thread(get_hub, self._hub_name, self._namespace)
                if hub is None:
                    raise LookupError(f"metrics hub {self._namespace}/{self._hub_name} not found")
                self._hub = hub
                await asyncio.wait_for(awaited(hub.report_many.remote(self.source_id, self.role, snapshots)),
                                       self.timeout_s)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # hub gone or restarting, collect() broke: try again next period
                self._hub = None
                self.pushes_failed += 1
                # Warn once per outage, not once a second.
                (log.debug if self._failing else log.warning)("metrics push from %s failed: %r",
                                                              self.source_id, exc)
                self._failing = True
                return False
            self.pushes_ok += 1
            self._failing = False
            return True

    async def stop(self, final: bool = True) -> None:
        """Stop the loop. final: push once more (complete counters), then tell the hub to stop
        counting this source's gauges."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        if final and await self.flush():
            try:
                await asyncio.wait_for(awaited(self._hub.forget.remote(self.source_id)), self.timeout_s)
            except Exception as exc:  # the hub will notice the silence after stale_after_s anyway
                log.debug("metrics forget for %s failed: %r", self.source_id, exc)

    async def _snapshots(self) -> dict[str, MetricsSnapshot]:
        result = self._collect()
        if inspect.isawaitable(result):
            result = await result
        if isinstance(result, MetricsSnapshot):
            return {self.product: result}
        return dict(result)

    async def _loop(self) -> None:
        while True:
            await self.flush()
            await asyncio.sleep(self.period_s)

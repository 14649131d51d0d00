"""The worker classes as the cluster deploys them: the same servers plus metrics reporting.

Workers know nothing of the cluster (arrows point down); these subclasses add
what a Serve deployment of them needs: a MetricsReporter pushing the worker's
stats to the metrics hub, labelled with the product (the pool, for products sharing one), started by the first
health check (Serve calls it every few seconds from the replica's event loop).
A replica's worker id is its Serve replica id (`SERVE_REPLICA::app#deployment#id`,
also its actor name in the "serve" namespace), so a metrics source names the
replica an operator would inspect or kill.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ray import serve
from ray.serve.exceptions import RayServeException

from cluster.autoscaling import engine_signals
from cluster.metric_names import KV_TRANSFER_SECONDS, ROLE_DECODE, ROLE_PREFILL
from cluster.metric_snapshots import Histogram, MetricsSnapshot, snapshot_from_decode_stats, snapshot_from_prefill_stats
from cluster.metrics_reporter import MetricsReporter
from decode_workers.server import DecodeServer
from prefill_workers.server import PrefillServer


def _replica_worker_id() -> str | None:
    """The Serve replica id when running inside a replica, else None (plain actor or test)."""
    try:
        return serve.get_replica_context().replica_id.to_full_id_str()
    except RayServeException:  # not inside a replica
        return None


def pin_to_cores(cores: Sequence[int]) -> None:
    """Run every thread of this process, and the threads it starts later, on `cores` (Linux).

    Called before the engine starts, so torch's threads inherit it. Raises ValueError when none of
    `cores` is available to this process (a config error better seen at start than as a slow replica).
    """
    if not cores:
        return
    allowed = set(cores) & os.sched_getaffinity(0)
    if not allowed:
        raise ValueError(f"cpu_affinity {sorted(cores)}: none of these cores is available "
                         f"(this process may use {sorted(os.sched_getaffinity(0))})")
    for tid in os.listdir("/proc/self/task"):  # sched_setaffinity(0) would pin the calling thread only
        try:
            os.sched_setaffinity(int(tid), allowed)
        except ProcessLookupError:  # the thread ended meanwhile
            continue


class _Deployed:
    """What a worker gets as a Serve replica, whatever its role: its cores pinned before its engine starts,
    the replica id as its worker id, and a MetricsReporter (labelled with its role and product) started by
    the first health check. Mixed in before the worker class; subclasses give `metrics_role` and `_snapshot`."""

    metrics_role: str

    def __init__(self, *args, product: str = "default", cpu_affinity: Sequence[int] = (), **kwargs) -> None:
        pin_to_cores(cpu_affinity)
        kwargs.setdefault("worker_id", _replica_worker_id())
        super().__init__(*args, **kwargs)
        self.product = product
        self._reporter = MetricsReporter(self.worker_id, self.metrics_role, product, self._snapshot)

    async def check_health(self) -> None:
        await super().check_health()
        self._reporter.start()

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve asks every replica for these each metrics push (cluster/autoscaling.py)."""
        return engine_signals((await self.stats()).engine)

    async def _snapshot(self) -> MetricsSnapshot:
        raise NotImplementedError


class PrefillDeployment(_Deployed, PrefillServer):
    metrics_role = ROLE_PREFILL

    async def _snapshot(self) -> MetricsSnapshot:
        return snapshot_from_prefill_stats(await self.stats())


class DecodeDeployment(_Deployed, DecodeServer):
    metrics_role = ROLE_DECODE

    def __init__(self, *args, **kwargs) -> None:
        self._transfer_seconds = Histogram.for_metric(KV_TRANSFER_SECONDS)
        super().__init__(*args, **kwargs)

    def observe_transfer(self, seconds: float, nbytes: int) -> None:
        self._transfer_seconds.observe(seconds)

    async def _snapshot(self) -> MetricsSnapshot:
        return snapshot_from_decode_stats(await self.stats(), disaggregated=self.prefill_handle is not None,
                                          kv_transfer_seconds=self._transfer_seconds)


@dataclass(frozen=True)
class WorkerClasses:
    """The classes build_app deploys per role, and keyword arguments both get on top of what the product gives.

    Serving always uses the defaults: no product file or CLI option reaches this. A benchmark may deploy
    subclasses of these two (bench/standin_app.py runs engines with no model behind them).
    """

    prefill: type = PrefillDeployment
    decode: type = DecodeDeployment
    kwargs: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not (issubclass(self.prefill, PrefillDeployment) and issubclass(self.decode, DecodeDeployment)):
            raise TypeError("worker classes must subclass PrefillDeployment and DecodeDeployment")


SERVING_WORKERS = WorkerClasses()  # what serving deploys: the real engines

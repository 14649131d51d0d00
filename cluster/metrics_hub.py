"""The metrics hub: one named Ray actor that keeps every source's latest snapshot and sums them per product.

Every replica pushes its cumulative MetricsSnapshot about once a second (metrics_reporter.py). The hub
keeps the latest snapshot per (source, product) and renders the sum per product in the Prometheus text
format (metrics_exposition.py) for the ingress's `GET /metrics`. One scrape target for the whole cluster,
no per-replica ports to discover.

Aggregation invariants (per product):
- counters and histograms are summed over every source ever seen, a dead
  source's last snapshot included, so they never decrease while the hub
  lives (a replica that restarts with a new id starts a new source; one that
  comes back with lower counts under the same id has its old snapshot folded
  into an archive first);
- gauges are summed over sources that reported within `stale_after_s` and
  were not `forget`-ed, so a dead replica's running requests vanish;
- kv_cache_usage_perc = sum(kv_blocks_used) / sum(kv_blocks_total) over
  those same live sources, in [0, 1].
A hub restart loses its state: counters then restart from the live replicas'
totals, which Prometheus sees as an ordinary counter reset.
The actor's name and namespace (HUB_NAME, NAMESPACE) are how every replica finds it: they do not change.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import ray
from prometheus_client import CollectorRegistry, generate_latest

from cluster.metric_names import BUCKETS
from cluster.metric_snapshots import HistogramSnapshot, MetricsSnapshot
from cluster.metrics_exposition import HubCollector

log = logging.getLogger(__name__)

HUB_NAME = "pdserve-metrics"
NAMESPACE = "pdserve"


@dataclass(frozen=True)
class SourceInfo:
    """What the hub knows of one reporting source (per product). age_s: seconds since its last report."""

    source_id: str
    product: str
    role: str
    age_s: float
    live: bool  # reported within stale_after_s and not forgotten: its gauges count
    gauges: dict[str, float] = field(default_factory=dict)  # its latest gauges (bare names)


@dataclass
class _Source:
    role: str
    snapshot: MetricsSnapshot
    last_seen: float  # hub clock, seconds
    forgotten: bool = False


@dataclass
class ProductTotals:
    """Summed counters and histograms of one product (also the archive of folded snapshots)."""

    counters: dict[str, float] = field(default_factory=dict)
    labelled: dict[str, dict[str, float]] = field(default_factory=dict)
    histograms: dict[str, HistogramSnapshot] = field(default_factory=dict)

    def add(self, snap: MetricsSnapshot) -> None:
        for name, v in snap.counters.items():
            self.counters[name] = self.counters.get(name, 0.0) + v
        for name, values in snap.labelled_counters.items():
            into = self.labelled.setdefault(name, {})
            for label, v in values.items():
                into[label] = into.get(label, 0.0) + v
        for name, h in snap.histograms.items():
            have = self.histograms.get(name)
            if have is None:  # canonical bounds first: a source with other buckets is rebucketed
                have = HistogramSnapshot.empty(BUCKETS.get(name, h.bounds))
            self.histograms[name] = have + h

    def copy(self) -> ProductTotals:
        return ProductTotals(dict(self.counters), {k: dict(v) for k, v in self.labelled.items()},
                             dict(self.histograms))


# product -> (summed counters and histograms, summed live gauges, live replicas per role)
Aggregate = dict[str, tuple[ProductTotals, dict[str, float], dict[str, int]]]


class MetricsHub:
    """Collects the latest snapshot per (source, product) and renders cluster sums per product.

    Meant to run as one named Ray actor (get_or_create_hub). Sources silent for retire_after_s are
    folded into a per-product archive and dropped, so memory stays bounded under replica churn; a
    report from a folded source is ignored (its counts are in the archive already).
    clock: seconds, monotonic (injectable for tests).
    """

    def __init__(self, stale_after_s: float = 10.0, retire_after_s: float | None = 3600.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.stale_after_s = stale_after_s
        self.retire_after_s = retire_after_s
        self._clock = clock
        self._sources: dict[tuple[str, str], _Source] = {}  # (source_id, product) -> latest
        self._archive: dict[str, ProductTotals] = {}  # product -> folded snapshots
        self._folded: set[tuple[str, str]] = set()
        self._roles: dict[str, set[str]] = {}  # product -> roles ever seen (num_replicas renders 0s)
        self._registry = CollectorRegistry(auto_describe=False)
        self._registry.register(HubCollector(self._aggregate))

    def report(self, source_id: str, role: str, product: str, snapshot: MetricsSnapshot) -> None:
        """Replace the source's snapshot for product (snapshots are cumulative: the latest is enough)."""
        key = (source_id, product)
        if key in self._folded:
            log.warning("metrics from retired source %s/%s ignored", source_id, product)
            return
        now = self._clock()
        prev = self._sources.get(key)
        if prev is not None and _went_back(prev.snapshot, snapshot):
            self._fold(key)  # the source restarted under the same id: keep what it had counted
        self._sources[key] = _Source(role, snapshot, now)
        self._roles.setdefault(product, set()).add(role)

    def report_many(self, source_id: str, role: str, snapshots: Mapping[str, MetricsSnapshot]) -> None:
        """report() for several products at once (an ingress replica serves them all)."""
        for product, snapshot in snapshots.items():
            self.report(source_id, role, product, snapshot)

    def forget(self, source_id: str) -> int:
        """A source is going away (graceful shutdown): its gauges stop counting now; its counters and
        histograms stay in the sums (monotonic). Returns how many (source, product) entries it had."""
        n = 0
        for (sid, _), src in self._sources.items():
            if sid == source_id:
                src.forgotten = True
                n += 1
        return n

    def sources(self) -> list[SourceInfo]:
        now = self._clock()
        return [SourceInfo(sid, product, s.role, now - s.last_seen, self._live(s, now), dict(s.snapshot.gauges))
                for (sid, product), s in sorted(self._sources.items())]

    def render(self) -> str:
        """Prometheus text exposition (format 0.0.4) of the per-product sums; see
        metrics_exposition.CONTENT_TYPE."""
        self._retire(self._clock())
        return generate_latest(self._registry).decode()

    def ready(self) -> bool:
        return True

    # ---- aggregation ----
    def _live(self, src: _Source, now: float) -> bool:
        return not src.forgotten and now - src.last_seen <= self.stale_after_s

    def _fold(self, key: tuple[str, str]) -> None:
        src = self._sources.pop(key)
        self._archive.setdefault(key[1], ProductTotals()).add(src.snapshot)

    def _retire(self, now: float) -> None:
        if self.retire_after_s is None:
            return
        for key, src in list(self._sources.items()):
            if now - src.last_seen > self.retire_after_s:
                self._fold(key)
                self._folded.add(key)

    def _aggregate(self) -> Aggregate:
        """product -> (summed counters and histograms, summed live gauges, live replicas per role)."""
        now = self._clock()
        out: Aggregate = {}
        for product in sorted(set(self._roles) | set(self._archive)):
            archive = self._archive.get(product)
            out[product] = (archive.copy() if archive else ProductTotals(), {},
                            dict.fromkeys(sorted(self._roles.get(product, ())), 0))
        for (_, product), src in self._sources.items():
            totals, gauges, replicas = out[product]
            totals.add(src.snapshot)
            if self._live(src, now):
                for name, v in src.snapshot.gauges.items():
                    gauges[name] = gauges.get(name, 0.0) + v
                replicas[src.role] = replicas.get(src.role, 0) + 1
        return out


def _went_back(old: MetricsSnapshot, new: MetricsSnapshot) -> bool:
    """True if a cumulative value in both old and new went down: the source restarted and counts from
    zero. (A name that merely disappears is no evidence; folding on it would count the rest twice.)"""
    if any(k in new.counters and new.counters[k] < v for k, v in old.counters.items()):
        return True
    if any(k in new.histograms and new.histograms[k].count < h.count for k, h in old.histograms.items()):
        return True
    return any(lv in new.labelled_counters.get(k, {}) and new.labelled_counters[k][lv] < v
               for k, values in old.labelled_counters.items() for lv, v in values.items())



def get_or_create_hub(stale_after_s: float = 10.0, name: str = HUB_NAME,
                      namespace: str = NAMESPACE) -> ray.actor.ActorHandle:
    """The cluster's metrics hub actor (detached from its creator, named, one per namespace).

    Restarted by Ray if it dies (max_restarts=-1), with empty state: see the module docstring."""
    actor = ray.remote(num_cpus=0, max_restarts=-1)(MetricsHub)
    return actor.options(name=name, namespace=namespace, get_if_exists=True,
                         lifetime="detached").remote(stale_after_s)


def get_hub(name: str = HUB_NAME, namespace: str = NAMESPACE) -> ray.actor.ActorHandle | None:
    """The running hub, or None (not created yet, restarting, or Ray not initialised)."""
    if not ray.is_initialized():  # never start a Ray cluster from a metrics lookup
        return None
    try:
        return ray.get_actor(name, namespace=namespace)
    except ValueError:
        return None

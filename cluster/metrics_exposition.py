"""Prometheus exposition of the hub's per-product sums: which families, with which labels and values.

Invariants of what the hub renders:
- every family in REQUIRED_COUNTERS / REQUIRED_GAUGES / REQUIRED_HISTOGRAMS, and every labelled counter
  with its known label values, is rendered for every product, at 0 before anything is counted (so rate()
  queries have a series from the start);
- each name is rendered `pdserve:`-prefixed and as one kind only: a name reported as two kinds keeps the
  first in gauge, counter, labelled, histogram order and the other is dropped with a warning;
- histograms are rendered with cumulative `le` counts, in seconds, in their canonical buckets (BUCKETS;
  the hub rebuckets a source that used others), a name without canonical buckets in its first source's;
- kv_blocks_used / kv_blocks_total are not rendered: they become kv_cache_usage_perc, in [0, 1].
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

from cluster.http_edge import APIError
from cluster.metric_names import (
    BUCKETS,
    COUNTER_LABELS,
    HELP,
    KNOWN_LABEL_VALUES,
    KV_BLOCKS_TOTAL,
    KV_BLOCKS_USED,
    KV_CACHE_USAGE_PERC,
    NUM_REPLICAS,
    PREFIX,
    REQUIRED_COUNTERS,
    REQUIRED_GAUGES,
    REQUIRED_HISTOGRAMS,
)
from cluster.metric_snapshots import HistogramSnapshot

if TYPE_CHECKING:  # the hub imports this module to render itself
    from cluster.metrics_hub import Aggregate

log = logging.getLogger(__name__)

# What MetricsHub.render() produces (the classic text format; legacy names only), for the HTTP response.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class HubCollector:
    """Turns the hub's per-product sums into metric families (prometheus_client's Collector protocol)."""

    def __init__(self, aggregate: Callable[[], Aggregate]) -> None:
        self.aggregate = aggregate  # the hub's per-product sums, taken afresh at each scrape

    def collect(self) -> Iterable[Metric]:
        agg = self.aggregate()
        kinds: dict[str, str] = {}  # bare name -> family kind, first wins (a name used twice is a bug)

        def claim(name: str, kind: str) -> bool:
            if kinds.setdefault(name, kind) != kind:
                log.warning("metric %r reported as both %s and %s; %s dropped", name, kinds[name], kind, kind)
                return False
            return True

        for kind in ("gauge", "counter", "labelled", "histogram"):
            for name in sorted(_names(agg, kind)):
                if claim(name, kind):
                    yield _family(kind, name, agg)


def _names(agg: Aggregate, kind: str) -> set[str]:
    if kind == "counter":
        return set(REQUIRED_COUNTERS).union(*(t.counters for t, _, _ in agg.values()))
    if kind == "labelled":
        return set(COUNTER_LABELS).union(*(t.labelled for t, _, _ in agg.values()))
    if kind == "histogram":
        return set(REQUIRED_HISTOGRAMS).union(*(t.histograms for t, _, _ in agg.values()))
    names = set(REQUIRED_GAUGES).union(*(g for _, g, _ in agg.values()))
    return (names - {KV_BLOCKS_USED, KV_BLOCKS_TOTAL}) | {KV_CACHE_USAGE_PERC, NUM_REPLICAS}


def _family(kind: str, name: str, agg: Aggregate) -> Metric:
    full, doc = PREFIX + name, HELP.get(name, f"pdserve {name}.")
    if kind == "counter":
        fam = CounterMetricFamily(full, doc, labels=["product"])
        for product, (totals, _, _) in agg.items():
            fam.add_metric([product], totals.counters.get(name, 0.0))
        return fam
    if kind == "labelled":
        fam = CounterMetricFamily(full, doc, labels=["product", COUNTER_LABELS.get(name, "reason")])
        for product, (totals, _, _) in agg.items():
            values = dict.fromkeys(KNOWN_LABEL_VALUES.get(name, ()), 0.0) | totals.labelled.get(name, {})
            for label, v in sorted(values.items()):
                fam.add_metric([product, label], v)
        return fam
    if kind == "histogram":
        fam = HistogramMetricFamily(full, doc, labels=["product"])
        for product, (totals, _, _) in agg.items():
            h = totals.histograms.get(name) or HistogramSnapshot.empty(BUCKETS.get(name, ()))
            cumulative, buckets = 0, []
            for bound, n in zip((*h.bounds, math.inf), h.bucket_counts, strict=True):
                cumulative += n
                buckets.append((floatToGoString(bound), cumulative))
            fam.add_metric([product], buckets, h.sum)
        return fam
    if name == NUM_REPLICAS:
        fam = GaugeMetricFamily(full, doc, labels=["product", "role"])
        for product, (_, _, replicas) in agg.items():
            for role, n in sorted(replicas.items()):
                fam.add_metric([product, role], n)
        return fam
    fam = GaugeMetricFamily(full, doc, labels=["product"])
    for product, (_, gauges, _) in agg.items():
        if name == KV_CACHE_USAGE_PERC:
            total = gauges.get(KV_BLOCKS_TOTAL, 0.0)
            value = min(1.0, max(0.0, gauges.get(KV_BLOCKS_USED, 0.0) / total)) if total > 0 else 0.0
        else:
            value = gauges.get(name, 0.0)
        fam.add_metric([product], value)
    return fam


async def scrape(flush: Callable[[], Awaitable[object]], render: Callable[[], Awaitable[str]], timeout_s: float) -> str:
    """The cluster's Prometheus text for GET /metrics: this replica's own snapshot pushed first (flush), then
    the hub's rendering. A hub that does not answer within timeout_s seconds is a 503, not a hung scrape."""
    try:
        async with asyncio.timeout(timeout_s):
            await flush()
            return await render()
    except TimeoutError as exc:
        raise APIError(503, f"the metrics hub did not answer within {timeout_s:g} s", "server_error",
                       "unavailable") from exc

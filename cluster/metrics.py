"""Cluster-wide Prometheus metrics: replicas push snapshots to one hub actor, the ingress renders it.

Every replica (ingress, prefill, decode) keeps its own cumulative counters,
gauges and histograms and pushes a `MetricsSnapshot` to the `MetricsHub`
actor about once a second (`MetricsReporter`). The hub keeps the latest
snapshot per (source, product) and renders the sum per product in the
Prometheus text format for the ingress's `GET /metrics`. One scrape target
for the whole cluster, no per-replica ports to discover.

Names follow vLLM's where the meaning is the same, prefixed `pdserve:`; a
snapshot holds the bare names (the constants below). prometheus_client
renders a counter `x` as `pdserve:x_total`.

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
"""

from __future__ import annotations

import asyncio
import bisect
import inspect
import logging
import math
import re
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import ray
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

from prefill_workers.remote_calls import awaited

if TYPE_CHECKING:  # only for types: the hub actor must not import torch and the engine
    from decode_workers.server import DecodeStats
    from engine.outputs import EngineStats
    from prefill_workers.server import PrefillStats

log = logging.getLogger(__name__)

HUB_NAME = "pdserve-metrics"
NAMESPACE = "pdserve"
PREFIX = "pdserve:"
# What render() produces (the classic text format; legacy names only), for the HTTP response.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Roles of a source (the `role` label of num_replicas).
ROLE_INGRESS = "ingress"
ROLE_PREFILL = "prefill"
ROLE_DECODE = "decode"

# Counters (rendered with a `_total` suffix). Token counts in tokens, bytes in bytes.
PREFIX_CACHE_QUERIES = "prefix_cache_queries"  # prompt tokens looked up in a prefix cache
PREFIX_CACHE_HITS = "prefix_cache_hits"  # of those, tokens found
PROMPT_TOKENS_COMPUTED = "prompt_tokens_computed"  # prompt tokens run through a model
PROMPT_TOKENS_CACHED = "prompt_tokens_cached"  # prompt tokens taken from a cache instead
GENERATION_TOKENS = "generation_tokens"
PREEMPTIONS = "preemptions"
KV_TRANSFER_BYTES = "kv_transfer_bytes"
KV_TRANSFER_FAILURES = "kv_transfer_failures"
PREFILL_FAILURES = "prefill_failures"
RECOMPUTED_PREFILLS = "recomputed_prefills"
REMOTE_PREFILLS = "remote_prefills"
DIRECTORY_BLOCKS_FETCHED = "prefix_directory_blocks_fetched"
DIRECTORY_BLOCKS_PUBLISHED = "prefix_directory_blocks_published"
DIRECTORY_ERRORS = "prefix_directory_errors"
# Labelled counters: bare name -> its one label besides product.
REQUEST_SUCCESS = "request_success"
REQUESTS_REJECTED = "requests_rejected"
COUNTER_LABELS = {REQUEST_SUCCESS: "finished_reason", REQUESTS_REJECTED: "reason"}
# Label values rendered (as 0) before any is counted, so rate() queries have a series from the start.
FINISHED_REASONS = ("stop", "length", "abort")
REJECT_REASONS = ("queue_full", "bad_request", "unauthorized", "too_long", "rate_limited")
KNOWN_LABEL_VALUES = {REQUEST_SUCCESS: FINISHED_REASONS, REQUESTS_REJECTED: REJECT_REASONS}

# Gauges sources report. kv_blocks_* are inputs to kv_cache_usage_perc, not rendered themselves.
NUM_REQUESTS_RUNNING = "num_requests_running"
NUM_REQUESTS_WAITING = "num_requests_waiting"
KV_BLOCKS_USED = "kv_blocks_used"
KV_BLOCKS_TOTAL = "kv_blocks_total"
KV_EXPORTS_ALIVE = "kv_exports_alive"
INGRESS_INFLIGHT = "ingress_inflight"  # samples the ingress is serving (admitted, not yet ended)
TOKEN_STREAMS_OPEN = "token_streams_open"  # the ingress's open token-stream queues
# Gauges only the hub computes.
KV_CACHE_USAGE_PERC = "kv_cache_usage_perc"
NUM_REPLICAS = "num_replicas"

# Histograms, in seconds.
TIME_TO_FIRST_TOKEN = "time_to_first_token_seconds"
INTER_TOKEN_LATENCY = "inter_token_latency_seconds"
E2E_REQUEST_LATENCY = "e2e_request_latency_seconds"
KV_TRANSFER_SECONDS = "kv_transfer_seconds"

# Bucket upper bounds: vLLM's for TTFT, inter-token and e2e latency (so dashboards carry over);
# ours for a KV transfer (sub-millisecond on one host up to seconds across nodes).
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
               20.0, 40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
               240.0, 480.0, 960.0, 1920.0, 7680.0)
KV_TRANSFER_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BUCKETS = {TIME_TO_FIRST_TOKEN: TTFT_BUCKETS, INTER_TOKEN_LATENCY: ITL_BUCKETS,
           E2E_REQUEST_LATENCY: E2E_BUCKETS, KV_TRANSFER_SECONDS: KV_TRANSFER_BUCKETS}

# Families rendered for every product even before anything is counted (the list and ours).
REQUIRED_COUNTERS = (PREFIX_CACHE_QUERIES, PREFIX_CACHE_HITS, PROMPT_TOKENS_COMPUTED, PROMPT_TOKENS_CACHED,
                     GENERATION_TOKENS, PREEMPTIONS, KV_TRANSFER_BYTES, KV_TRANSFER_FAILURES)
REQUIRED_GAUGES = (NUM_REQUESTS_RUNNING, NUM_REQUESTS_WAITING)
REQUIRED_HISTOGRAMS = (TIME_TO_FIRST_TOKEN, INTER_TOKEN_LATENCY, E2E_REQUEST_LATENCY, KV_TRANSFER_SECONDS)

HELP = {
    PREFIX_CACHE_QUERIES: "Prefix cache queries, in prompt tokens looked up.",
    PREFIX_CACHE_HITS: "Prefix cache hits, in prompt tokens found cached.",
    PROMPT_TOKENS_COMPUTED: "Prompt tokens run through a model (prefill work done).",
    PROMPT_TOKENS_CACHED: "Prompt tokens taken from a prefix cache (local pool or cluster directory).",
    GENERATION_TOKENS: "Generated tokens.",
    PREEMPTIONS: "Requests preempted (KV blocks ran out; recomputed later).",
    KV_TRANSFER_BYTES: "Bytes of KV blocks moved from prefill to decode workers.",
    KV_TRANSFER_FAILURES: "KV transfers that failed (the prompt was recomputed on the decode worker).",
    PREFILL_FAILURES: "Remote prefill calls that failed or timed out (recomputed on the decode worker).",
    RECOMPUTED_PREFILLS: "Prompts a decode worker computed itself after a failed prefill or transfer.",
    REMOTE_PREFILLS: "Prompts prefilled on a prefill worker whose KV was imported by a decode worker.",
    DIRECTORY_BLOCKS_FETCHED: "KV blocks fetched from the cluster prefix directory.",
    DIRECTORY_BLOCKS_PUBLISHED: "KV blocks published to the cluster prefix directory.",
    DIRECTORY_ERRORS: "Prefix directory calls that failed (served without the directory).",
    REQUEST_SUCCESS: "Requests finished, by finish reason.",
    REQUESTS_REJECTED: "Requests rejected before any work, by reason.",
    NUM_REQUESTS_RUNNING: "Requests in engine batches now (prefill and decode workers).",
    NUM_REQUESTS_WAITING: "Requests queued for an engine batch now.",
    KV_EXPORTS_ALIVE: "KV exports held under a lease by prefill workers now.",
    INGRESS_INFLIGHT: "Samples the HTTP ingress is serving now (counted against max_queue_len).",
    TOKEN_STREAMS_OPEN: "Token-stream queues open on the HTTP ingress now (one per sample being streamed).",
    KV_CACHE_USAGE_PERC: "KV-cache usage over all workers: used blocks / total blocks (1 means 100 percent).",
    NUM_REPLICAS: "Replicas reporting metrics now, by role.",
    TIME_TO_FIRST_TOKEN: "Time to first token in seconds.",
    INTER_TOKEN_LATENCY: "Time between consecutive output tokens in seconds.",
    E2E_REQUEST_LATENCY: "End-to-end request latency in seconds.",
    KV_TRANSFER_SECONDS: "Time to fetch one request's KV blocks in seconds.",
}

_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")  # bare names: no prefix, no colon


# ---- wire formats ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class HistogramSnapshot:
    """Cumulative since the source started. bucket_counts[i] counts observations in (bounds[i-1], bounds[i]]
    (not cumulative); the last entry is the +Inf overflow, so len(bucket_counts) == len(bounds) + 1 and
    count == sum(bucket_counts). sum is in the observed unit (seconds here)."""

    bounds: tuple[float, ...]
    bucket_counts: tuple[int, ...]
    sum: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        if len(self.bucket_counts) != len(self.bounds) + 1:
            raise ValueError(f"{len(self.bucket_counts)} bucket counts for {len(self.bounds)} bounds (+Inf)")
        if any(b <= a for a, b in zip(self.bounds, self.bounds[1:], strict=False)):
            raise ValueError(f"bucket bounds must increase strictly: {self.bounds}")
        if self.count != sum(self.bucket_counts):
            raise ValueError(f"count {self.count} != sum of bucket counts {sum(self.bucket_counts)}")

    @classmethod
    def empty(cls, bounds: Sequence[float]) -> HistogramSnapshot:
        return cls(tuple(bounds), (0,) * (len(bounds) + 1))

    def rebucket(self, bounds: Sequence[float]) -> HistogramSnapshot:
        """The same observations counted in other buckets. Each of our buckets moves to the first target
        bucket whose bound is >= ours, so `le` stays an upper bound (counts can only move up)."""
        bounds = tuple(bounds)
        if bounds == self.bounds:
            return self
        counts = [0] * (len(bounds) + 1)
        for i, n in enumerate(self.bucket_counts):
            j = bisect.bisect_left(bounds, self.bounds[i]) if i < len(self.bounds) else len(bounds)
            counts[j] += n
        return HistogramSnapshot(bounds, tuple(counts), self.sum, self.count)

    def __add__(self, other: HistogramSnapshot) -> HistogramSnapshot:
        """Sum in our buckets (other is rebucketed first if its bounds differ)."""
        other = other.rebucket(self.bounds)
        counts = tuple(a + b for a, b in zip(self.bucket_counts, other.bucket_counts, strict=True))
        return HistogramSnapshot(self.bounds, counts, self.sum + other.sum, self.count + other.count)


@dataclass(frozen=True)
class MetricsSnapshot:
    """One source's metrics at one moment: what a replica pushes to the hub.

    counters: bare name -> cumulative value since the source started (never decreases).
    labelled_counters: bare name -> label value -> cumulative value; the label's name is
        COUNTER_LABELS[name] (e.g. request_success -> finished_reason), "reason" if not listed.
    gauges: bare name -> value now (kv_blocks_used / kv_blocks_total feed kv_cache_usage_perc).
    histograms: bare name -> cumulative HistogramSnapshot.
    Names are bare (no `pdserve:` prefix, no `_total`): [a-zA-Z_][a-zA-Z0-9_]*.
    """

    counters: dict[str, float] = field(default_factory=dict)
    gauges: dict[str, float] = field(default_factory=dict)
    histograms: dict[str, HistogramSnapshot] = field(default_factory=dict)
    labelled_counters: dict[str, dict[str, float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for names in (self.counters, self.gauges, self.histograms, self.labelled_counters):
            for name in names:
                if not _NAME.match(name):
                    raise ValueError(f"bad metric name {name!r}: bare names only, [a-zA-Z_][a-zA-Z0-9_]*")
        for name in (*self.counters, *self.labelled_counters):
            if name.endswith("_total"):  # prometheus_client appends it to counters itself
                raise ValueError(f"bad counter name {name!r}: leave out _total")


@dataclass(frozen=True)
class SourceInfo:
    """What the hub knows of one reporting source (per product). age_s: seconds since its last report."""

    source_id: str
    product: str
    role: str
    age_s: float
    live: bool  # reported within stale_after_s and not forgotten: its gauges count
    gauges: dict[str, float] = field(default_factory=dict)  # its latest gauges (bare names)


# ---- recording inside a replica ---------------------------------------------------------------------
class Histogram:
    """A local histogram with fixed bucket upper bounds; thread-safe (the engine thread may observe).

    Invariant: count == sum of bucket counts; sum is the sum of observed values (NaN is ignored).

    Ours rather than prometheus_client's Histogram (which renders /metrics here, in _HubCollector): a
    replica's histogram travels to the hub as a mergeable HistogramSnapshot, which the library's
    in-process type does not give (its collect() yields cumulative samples to convert back), it would
    let one NaN poison the sum for good, and it is slower on both paths: observe 1.1 us here against
    1.6 us, snapshot 3.6 us against 80 us for collect() (TTFT buckets, 200,000 observations).
    """

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(float(b) for b in bounds)
        HistogramSnapshot.empty(self.bounds)  # validates the bounds
        self._counts = [0] * (len(self.bounds) + 1)
        self._sum = 0.0
        self._lock = threading.Lock()

    @classmethod
    def for_metric(cls, name: str) -> Histogram:
        """A histogram with the standard buckets of a known metric (e.g. TIME_TO_FIRST_TOKEN)."""
        return cls(BUCKETS[name])

    def observe(self, value: float) -> None:
        if math.isnan(value):  # would poison sum forever
            return
        i = bisect.bisect_left(self.bounds, value)  # first bound >= value: Prometheus `le` semantics
        with self._lock:
            self._counts[i] += 1
            self._sum += value

    def snapshot(self) -> HistogramSnapshot:
        with self._lock:
            counts = tuple(self._counts)
            total = self._sum
        return HistogramSnapshot(self.bounds, counts, total, sum(counts))


def _as_histogram_snapshots(histograms: Mapping[str, Histogram | HistogramSnapshot] | None
                            ) -> dict[str, HistogramSnapshot]:
    return {name: h.snapshot() if isinstance(h, Histogram) else h for name, h in (histograms or {}).items()}


def snapshot_from_engine_stats(engine: EngineStats, *, count_generation: bool = True,
                               count_cached_prompt: bool = True,
                               counters: Mapping[str, float] | None = None,
                               gauges: Mapping[str, float] | None = None,
                               histograms: Mapping[str, Histogram | HistogramSnapshot] | None = None,
                               labelled_counters: Mapping[str, Mapping[str, float]] | None = None
                               ) -> MetricsSnapshot:
    """A snapshot of one engine's EngineStats, plus whatever the caller measures itself.

    count_generation / count_cached_prompt: False where another engine already counts the same tokens
    (see snapshot_from_prefill_stats / snapshot_from_decode_stats), so cluster sums count each once.
    """
    c = {
        PREFIX_CACHE_QUERIES: engine.prefix_cache_queries,
        PREFIX_CACHE_HITS: engine.prefix_cache_hits,
        PROMPT_TOKENS_COMPUTED: engine.prompt_tokens_computed,
        PREEMPTIONS: engine.num_preemptions,
    }
    if count_generation:
        c[GENERATION_TOKENS] = engine.num_generated_tokens
    if count_cached_prompt:
        c[PROMPT_TOKENS_CACHED] = engine.prompt_tokens_cached
    c.update(counters or {})
    g = {
        NUM_REQUESTS_RUNNING: engine.num_requests_running,
        NUM_REQUESTS_WAITING: engine.num_requests_waiting,
        KV_BLOCKS_USED: engine.num_blocks_total - engine.num_blocks_free,  # held by requests, like kv_cache_usage
        KV_BLOCKS_TOTAL: engine.num_blocks_total,
    }
    g.update(gauges or {})
    return MetricsSnapshot(
        counters={k: float(v) for k, v in c.items()}, gauges={k: float(v) for k, v in g.items()},
        histograms=_as_histogram_snapshots(histograms),
        labelled_counters={k: {lv: float(n) for lv, n in v.items()} for k, v in (labelled_counters or {}).items()},
    )


def snapshot_from_prefill_stats(stats: PrefillStats,
                                histograms: Mapping[str, Histogram | HistogramSnapshot] | None = None
                                ) -> MetricsSnapshot:
    """A PrefillServer's snapshot. Its one sampled token per request is not counted as generated:
    the decode engine that continues the request counts that token again."""
    return snapshot_from_engine_stats(
        stats.engine, count_generation=False, histograms=histograms,
        counters={DIRECTORY_BLOCKS_FETCHED: stats.directory_blocks_fetched,
                  DIRECTORY_BLOCKS_PUBLISHED: stats.directory_blocks_published,
                  DIRECTORY_ERRORS: stats.directory_errors},
        gauges={KV_EXPORTS_ALIVE: stats.exports_alive},
    )


def snapshot_from_decode_stats(stats: DecodeStats, *, disaggregated: bool = True,
                               kv_transfer_seconds: Histogram | HistogramSnapshot | None = None,
                               local_prompt_tokens_cached: int | None = None,
                               histograms: Mapping[str, Histogram | HistogramSnapshot] | None = None,
                               labelled_counters: Mapping[str, Mapping[str, float]] | None = None
                               ) -> MetricsSnapshot:
    """A DecodeServer's snapshot.

    disaggregated: the engine's prompt_tokens_cached then repeats what the prefill worker already counted
    (accept_first_token passes its num_cached_tokens on), so it is left out; local_prompt_tokens_cached, when the
    worker tracks it, counts the cached tokens of prompts it computed itself (fallbacks) instead.
    kv_transfer_seconds: per-transfer observations; without it the family stays empty for this source
    (DecodeStats only has the total seconds, which cannot be put in buckets).
    """
    counters = {KV_TRANSFER_BYTES: stats.kv_transfer_bytes, KV_TRANSFER_FAILURES: stats.kv_transfer_failures,
                PREFILL_FAILURES: stats.prefill_failures, RECOMPUTED_PREFILLS: stats.recomputed_prefills,
                REMOTE_PREFILLS: stats.remote_prefills}
    if disaggregated and local_prompt_tokens_cached is not None:
        counters[PROMPT_TOKENS_CACHED] = local_prompt_tokens_cached
    hists = dict(histograms or {})
    if kv_transfer_seconds is not None:
        hists[KV_TRANSFER_SECONDS] = kv_transfer_seconds
    return snapshot_from_engine_stats(stats.engine, count_cached_prompt=not disaggregated, counters=counters,
                                      histograms=hists, labelled_counters=labelled_counters)


# ---- the hub ------------------------------------------------------------------------------------------
@dataclass
class _Source:
    role: str
    snapshot: MetricsSnapshot
    last_seen: float  # hub clock, seconds
    forgotten: bool = False


@dataclass
class _Totals:
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

    def copy(self) -> _Totals:
        return _Totals(dict(self.counters), {k: dict(v) for k, v in self.labelled.items()}, dict(self.histograms))


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
        self._archive: dict[str, _Totals] = {}  # product -> folded snapshots
        self._folded: set[tuple[str, str]] = set()
        self._roles: dict[str, set[str]] = {}  # product -> roles ever seen (num_replicas renders 0s)
        self._registry = CollectorRegistry(auto_describe=False)
        self._registry.register(_HubCollector(self))

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
        """Prometheus text exposition (format 0.0.4) of the per-product sums; see CONTENT_TYPE."""
        self._retire(self._clock())
        return generate_latest(self._registry).decode()

    def ready(self) -> bool:
        return True

    # ---- aggregation ----
    def _live(self, src: _Source, now: float) -> bool:
        return not src.forgotten and now - src.last_seen <= self.stale_after_s

    def _fold(self, key: tuple[str, str]) -> None:
        src = self._sources.pop(key)
        self._archive.setdefault(key[1], _Totals()).add(src.snapshot)

    def _retire(self, now: float) -> None:
        if self.retire_after_s is None:
            return
        for key, src in list(self._sources.items()):
            if now - src.last_seen > self.retire_after_s:
                self._fold(key)
                self._folded.add(key)

    def _aggregate(self) -> dict[str, tuple[_Totals, dict[str, float], dict[str, int]]]:
        """product -> (summed counters and histograms, summed live gauges, live replicas per role)."""
        now = self._clock()
        out: dict[str, tuple[_Totals, dict[str, float], dict[str, int]]] = {}
        for product in sorted(set(self._roles) | set(self._archive)):
            archive = self._archive.get(product)
            out[product] = (archive.copy() if archive else _Totals(), {},
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


class _HubCollector:
    """Turns the hub's per-product sums into metric families (prometheus_client's Collector protocol)."""

    def __init__(self, hub: MetricsHub) -> None:
        self.hub = hub

    def collect(self) -> Iterable[Metric]:
        agg = self.hub._aggregate()
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


def _names(agg: dict[str, tuple[_Totals, dict[str, float], dict[str, int]]], kind: str) -> set[str]:
    if kind == "counter":
        return set(REQUIRED_COUNTERS).union(*(t.counters for t, _, _ in agg.values()))
    if kind == "labelled":
        return set(COUNTER_LABELS).union(*(t.labelled for t, _, _ in agg.values()))
    if kind == "histogram":
        return set(REQUIRED_HISTOGRAMS).union(*(t.histograms for t, _, _ in agg.values()))
    names = set(REQUIRED_GAUGES).union(*(g for _, g, _ in agg.values()))
    return (names - {KV_BLOCKS_USED, KV_BLOCKS_TOTAL}) | {KV_CACHE_USAGE_PERC, NUM_REPLICAS}


def _family(kind: str, name: str, agg: dict[str, tuple[_Totals, dict[str, float], dict[str, int]]]) -> Metric:
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


# ---- pushing from a replica -------------------------------------------------------------------------
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

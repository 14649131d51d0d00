"""Cluster metrics: local histograms, the hub's per-product aggregation, rendering, and pushing over Ray."""

from __future__ import annotations

import asyncio
import math
import time
import uuid

import pytest
from prometheus_client.parser import text_string_to_metric_families

from cluster.http_edge import APIError
from cluster.metric_names import (
    DIRECTORY_BLOCKS_FETCHED,
    E2E_REQUEST_LATENCY,
    GENERATION_TOKENS,
    KV_BLOCKS_TOTAL,
    KV_BLOCKS_USED,
    KV_EXPORTS_ALIVE,
    KV_TRANSFER_BYTES,
    KV_TRANSFER_FAILURES,
    KV_TRANSFER_SECONDS,
    LOCAL_PREFILLS,
    NUM_REPLICAS,
    NUM_REQUESTS_RUNNING,
    NUM_REQUESTS_WAITING,
    PREEMPTIONS,
    PREFIX,
    PREFIX_CACHE_QUERIES,
    PROMPT_TOKENS_CACHED,
    REMOTE_PREFILLS,
    REQUEST_SUCCESS,
    REQUESTS_REJECTED,
    ROLE_DECODE,
    ROLE_INGRESS,
    ROLE_PREFILL,
    TIME_TO_FIRST_TOKEN,
    TTFT_BUCKETS,
)
from cluster.metric_snapshots import (
    Histogram,
    HistogramSnapshot,
    MetricsSnapshot,
    snapshot_from_decode_stats,
    snapshot_from_engine_stats,
    snapshot_from_prefill_stats,
)
from cluster.metrics_exposition import scrape
from cluster.metrics_hub import MetricsHub, get_or_create_hub
from cluster.metrics_reporter import MetricsReporter
from decode_workers.server import DecodeStats
from engine.outputs import EngineStats
from prefill_workers.server import PrefillStats


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _hist(name: str, *values: float) -> HistogramSnapshot:
    h = Histogram.for_metric(name)
    for v in values:
        h.observe(v)
    return h.snapshot()


def _snap(counters=None, gauges=None, histograms=None, labelled=None) -> MetricsSnapshot:
    return MetricsSnapshot(counters=dict(counters or {}), gauges=dict(gauges or {}),
                             histograms=dict(histograms or {}), labelled_counters=dict(labelled or {}))


def _parse(text: str) -> dict[str, object]:
    """family name -> Metric (prometheus_client's parser: proves the text is valid exposition)."""
    return {f.name: f for f in text_string_to_metric_families(text)}


def _value(families: dict, family: str, sample: str, **labels: str) -> float:
    matches = [s.value for s in families[family].samples if s.name == sample and s.labels == labels]
    assert len(matches) == 1, (family, sample, labels, families[family].samples)
    return matches[0]


def _counter(families: dict, name: str, product: str, **labels: str) -> float:
    return _value(families, PREFIX + name, PREFIX + name + "_total", product=product, **labels)


def _gauge(families: dict, name: str, product: str, **labels: str) -> float:
    return _value(families, PREFIX + name, PREFIX + name, product=product, **labels)


def _bucket(families: dict, name: str, le: str, product: str) -> float:
    return _value(families, PREFIX + name, PREFIX + name + "_bucket", le=le, product=product)


def _engine_stats(**overrides) -> EngineStats:
    fields = dict(num_blocks_total=100, num_blocks_free=75, kv_cache_usage=0.25, num_requests_running=3,
                  num_requests_waiting=2, num_requests_deferred=1, num_requests_held=0, prefix_cache_queries=640,
                  prefix_cache_hits=320, prompt_tokens_computed=400, prompt_tokens_cached=320, num_preemptions=1,
                  num_generated_tokens=90)
    fields.update(overrides)
    return EngineStats(**fields)


# ---- Histogram ----------------------------------------------------------------------------------------
def test_histogram_buckets_follow_prometheus_le() -> None:
    h = Histogram([0.1, 1.0])
    for v in (0.05, 0.1, 0.5, 1.0, 7.0, math.nan):
        h.observe(v)
    s = h.snapshot()
    assert s.bounds == (0.1, 1.0)
    assert s.bucket_counts == (2, 2, 1)  # a value equal to a bound is counted in that bound's bucket
    assert s.count == 5 and s.sum == pytest.approx(8.65)  # NaN ignored
    assert Histogram.for_metric(TIME_TO_FIRST_TOKEN).bounds == TTFT_BUCKETS


def test_histogram_snapshot_checks_and_merges() -> None:
    with pytest.raises(ValueError):
        HistogramSnapshot((1.0, 2.0), (1, 1), 1.0, 2)  # one count short of the +Inf bucket
    with pytest.raises(ValueError):
        HistogramSnapshot((2.0, 1.0), (0, 0, 0))  # bounds must increase
    with pytest.raises(ValueError):
        HistogramSnapshot((1.0,), (1, 1), 1.0, 3)  # count != sum of buckets
    a = HistogramSnapshot((0.1, 1.0), (1, 2, 3), 10.0, 6)
    b = HistogramSnapshot((0.05, 0.5, 5.0), (1, 1, 1, 1), 7.0, 4)
    total = a + b  # (0.05->0.1, 0.5->1.0, 5.0->+Inf): counts only move up
    assert total.bounds == a.bounds and total.bucket_counts == (2, 3, 5)
    assert total.count == 10 and total.sum == 17.0


def test_snapshot_rejects_bad_names() -> None:
    with pytest.raises(ValueError):
        MetricsSnapshot(counters={"pdserve:x": 1.0})
    with pytest.raises(ValueError):
        MetricsSnapshot(counters={"generation_tokens_total": 1.0})  # _total is added when rendering
    MetricsSnapshot(gauges={KV_BLOCKS_TOTAL: 1.0})  # a gauge may end in _total


# ---- aggregation --------------------------------------------------------------------------------------
def test_two_sources_are_summed_and_kv_usage_comes_from_blocks() -> None:
    hub = MetricsHub(clock=FakeClock())
    hub.report("d1", ROLE_DECODE, "chat", _snap(
        {PREFIX_CACHE_QUERIES: 100, GENERATION_TOKENS: 10},
        {NUM_REQUESTS_RUNNING: 2, KV_BLOCKS_USED: 3, KV_BLOCKS_TOTAL: 10},
        {TIME_TO_FIRST_TOKEN: _hist(TIME_TO_FIRST_TOKEN, 0.003, 0.3)},
        {REQUEST_SUCCESS: {"stop": 2}}))
    hub.report("d2", ROLE_DECODE, "chat", _snap(
        {PREFIX_CACHE_QUERIES: 50, GENERATION_TOKENS: 5},
        {NUM_REQUESTS_RUNNING: 1, KV_BLOCKS_USED: 5, KV_BLOCKS_TOTAL: 30},
        {TIME_TO_FIRST_TOKEN: _hist(TIME_TO_FIRST_TOKEN, 0.004, 5000.0)},
        {REQUEST_SUCCESS: {"stop": 1, "length": 4}}))
    hub.report("p1", ROLE_PREFILL, "chat", _snap({PREFIX_CACHE_QUERIES: 7}, {KV_BLOCKS_TOTAL: 10}))
    fams = _parse(hub.render())
    assert _counter(fams, "prefix_cache_queries", "chat") == 157
    assert _counter(fams, "generation_tokens", "chat") == 15
    assert _gauge(fams, "num_requests_running", "chat") == 3
    # 8 of 50 blocks, not the mean of 0.3, 0.1667 and 0.
    assert _gauge(fams, "kv_cache_usage_perc", "chat") == 0.16
    assert _counter(fams, REQUEST_SUCCESS, "chat", finished_reason="stop") == 3
    assert _counter(fams, REQUEST_SUCCESS, "chat", finished_reason="length") == 4
    assert _counter(fams, REQUEST_SUCCESS, "chat", finished_reason="abort") == 0
    assert _bucket(fams, TIME_TO_FIRST_TOKEN, "0.001", "chat") == 0
    assert _bucket(fams, TIME_TO_FIRST_TOKEN, "0.005", "chat") == 2  # cumulative, as exposed
    assert _bucket(fams, TIME_TO_FIRST_TOKEN, "0.5", "chat") == 3
    assert _bucket(fams, TIME_TO_FIRST_TOKEN, "2560.0", "chat") == 3
    assert _bucket(fams, TIME_TO_FIRST_TOKEN, "+Inf", "chat") == 4
    ttft = PREFIX + TIME_TO_FIRST_TOKEN
    assert _value(fams, ttft, ttft + "_count", product="chat") == 4
    assert _value(fams, ttft, ttft + "_sum", product="chat") == pytest.approx(5000.307)
    assert _gauge(fams, NUM_REPLICAS, "chat", role="decode") == 2
    assert _gauge(fams, NUM_REPLICAS, "chat", role="prefill") == 1


def test_stale_source_keeps_counters_but_loses_gauges() -> None:
    clock = FakeClock()
    hub = MetricsHub(stale_after_s=10.0, clock=clock)
    gauges = {NUM_REQUESTS_RUNNING: 4, NUM_REQUESTS_WAITING: 1, KV_BLOCKS_USED: 10, KV_BLOCKS_TOTAL: 10}
    hub.report("dead", ROLE_DECODE, "chat", _snap({GENERATION_TOKENS: 100}, gauges,
                                                      {E2E_REQUEST_LATENCY: _hist(E2E_REQUEST_LATENCY, 2.0)}))
    hub.report("alive", ROLE_DECODE, "chat", _snap({GENERATION_TOKENS: 1},
                                                       {NUM_REQUESTS_RUNNING: 1, KV_BLOCKS_TOTAL: 10}))
    clock.now += 11.0
    hub.report("alive", ROLE_DECODE, "chat", _snap({GENERATION_TOKENS: 2},
                                                       {NUM_REQUESTS_RUNNING: 1, KV_BLOCKS_TOTAL: 10}))
    fams = _parse(hub.render())
    assert _counter(fams, "generation_tokens", "chat") == 102
    assert _gauge(fams, "num_requests_running", "chat") == 1
    assert _gauge(fams, "num_requests_waiting", "chat") == 0
    assert _gauge(fams, "kv_cache_usage_perc", "chat") == 0.0
    e2e = PREFIX + E2E_REQUEST_LATENCY
    assert _value(fams, e2e, e2e + "_count", product="chat") == 1
    assert _gauge(fams, NUM_REPLICAS, "chat", role="decode") == 1
    live = {s.source_id: s.live for s in hub.sources()}
    assert live == {"alive": True, "dead": False}


def test_forget_drops_gauges_now_and_keeps_counters() -> None:
    hub = MetricsHub(clock=FakeClock())
    hub.report("ing", ROLE_INGRESS, "chat", _snap(labelled={REQUESTS_REJECTED: {"queue_full": 3}},
                                                    gauges={NUM_REQUESTS_WAITING: 5}))
    assert hub.forget("ing") == 1 and hub.forget("unknown") == 0
    fams = _parse(hub.render())
    assert _counter(fams, REQUESTS_REJECTED, "chat", reason="queue_full") == 3
    assert _gauge(fams, "num_requests_waiting", "chat") == 0
    hub.report("ing", ROLE_INGRESS, "chat", _snap(gauges={NUM_REQUESTS_WAITING: 2}))  # back after all
    fams = _parse(hub.render())
    assert _gauge(fams, "num_requests_waiting", "chat") == 2


def test_counters_stay_monotonic_when_a_source_restarts_or_retires() -> None:
    clock = FakeClock()
    hub = MetricsHub(stale_after_s=10.0, retire_after_s=100.0, clock=clock)

    def tokens() -> float:
        fams = _parse(hub.render())
        return _counter(fams, "generation_tokens", "chat")

    hub.report("d", ROLE_DECODE, "chat", _snap({GENERATION_TOKENS: 50, PREEMPTIONS: 2}))
    hub.report("d", ROLE_DECODE, "chat", _snap({GENERATION_TOKENS: 60}))  # a name gone is no restart
    assert tokens() == 60
    hub.report("d", ROLE_DECODE, "chat", _snap({GENERATION_TOKENS: 5}))  # same id, counting from zero
    assert tokens() == 65
    clock.now += 101.0
    assert tokens() == 65 and hub.sources() == []  # folded into the archive, still counted
    hub.report("d", ROLE_DECODE, "chat", _snap({GENERATION_TOKENS: 6}))  # a retired id is ignored
    assert tokens() == 65


def test_render_has_every_required_family_per_product() -> None:
    hub = MetricsHub(clock=FakeClock())
    engine = _engine_stats()
    hub.report("p", ROLE_PREFILL, "chat", snapshot_from_engine_stats(engine, count_generation=False))
    hub.report("d", ROLE_DECODE, "code", snapshot_from_engine_stats(engine))
    hub.report_many("i", ROLE_INGRESS, {"chat": _snap(), "code": _snap()})
    fams = _parse(hub.render())
    counters = ["prefix_cache_queries", "prefix_cache_hits", "prompt_tokens_computed", "prompt_tokens_cached",
                "kv_transfer_bytes", "kv_transfer_failures", "preemptions", "kv_swap_outs", "generation_tokens",
                "request_success", "requests_rejected"]
    gauges = ["kv_cache_usage_perc", "num_requests_running", "num_requests_waiting", "num_replicas"]
    histograms = ["time_to_first_token_seconds", "inter_token_latency_seconds", "e2e_request_latency_seconds",
                  "kv_transfer_seconds"]
    expected = {**dict.fromkeys(counters, "counter"), **dict.fromkeys(gauges, "gauge"),
                **dict.fromkeys(histograms, "histogram")}
    for name, kind in expected.items():
        fam = fams["pdserve:" + name]
        assert fam.type == kind, name
        assert {s.labels["product"] for s in fam.samples} == {"chat", "code"}, name
    for name in counters:
        assert all(s.name == f"pdserve:{name}_total" for s in fams["pdserve:" + name].samples)
    assert set(fams) == {"pdserve:" + n for n in expected}
    assert _gauge(fams, "kv_cache_usage_perc", "code") == 0.25


def test_snapshots_from_worker_stats_count_each_token_once() -> None:
    engine = _engine_stats()
    prefill = snapshot_from_prefill_stats(PrefillStats("p", engine, exports_alive=2, directory_blocks_fetched=4,
                                                         directory_blocks_published=6, directory_errors=0))
    assert GENERATION_TOKENS not in prefill.counters  # the decode engine counts the first token too
    assert prefill.counters[PROMPT_TOKENS_CACHED] == 320
    assert prefill.counters[DIRECTORY_BLOCKS_FETCHED] == 4 and prefill.gauges[KV_EXPORTS_ALIVE] == 2
    assert prefill.gauges[KV_BLOCKS_USED] == 25 and prefill.gauges[KV_BLOCKS_TOTAL] == 100

    stats = DecodeStats("d", engine, kv_transfer_bytes=4096, kv_transfer_seconds=0.5, kv_transfer_failures=1,
                        prefill_failures=0, recomputed_prefills=1, remote_prefills=3, local_prefills=2)
    transfer = Histogram.for_metric(KV_TRANSFER_SECONDS)
    transfer.observe(0.002)
    decode = snapshot_from_decode_stats(stats, kv_transfer_seconds=transfer,
                                          labelled_counters={REQUEST_SUCCESS: {"stop": 3}})
    assert PROMPT_TOKENS_CACHED not in decode.counters  # the prefill worker counted those tokens
    assert decode.counters[GENERATION_TOKENS] == 90 and decode.counters[KV_TRANSFER_BYTES] == 4096
    assert decode.counters[KV_TRANSFER_FAILURES] == 1
    assert (decode.counters[REMOTE_PREFILLS], decode.counters[LOCAL_PREFILLS]) == (3, 2)  # both prefill paths
    assert decode.histograms[KV_TRANSFER_SECONDS].count == 1
    assert decode.labelled_counters[REQUEST_SUCCESS] == {"stop": 3.0}
    assert snapshot_from_decode_stats(stats, local_prompt_tokens_cached=16).counters[PROMPT_TOKENS_CACHED] == 16
    colocated = snapshot_from_decode_stats(stats, disaggregated=False)
    assert colocated.counters[PROMPT_TOKENS_CACHED] == 320


def test_a_scrape_answers_503_when_the_hub_does_not_answer_in_time() -> None:
    flushed: list[bool] = []

    async def flush() -> None:
        flushed.append(True)

    async def render() -> str:
        return "# the cluster's metrics\n"

    async def hung() -> str:
        await asyncio.Event().wait()  # a hub stuck (or a GCS outage): never answers
        return ""

    assert asyncio.run(scrape(flush, render, timeout_s=5.0)) == "# the cluster's metrics\n" and flushed
    started = time.monotonic()
    with pytest.raises(APIError) as info:
        asyncio.run(scrape(flush, hung, timeout_s=0.05))
    assert (info.value.status, info.value.code) == (503, "unavailable") and "0.05 s" in info.value.message
    assert time.monotonic() - started < 5.0


def test_reporter_without_a_hub_never_raises() -> None:
    def broken() -> MetricsSnapshot:
        raise RuntimeError("stats unavailable")

    async def run() -> tuple[bool, bool, int]:
        missing = MetricsReporter("r", ROLE_DECODE, "chat", _snap, hub_name=f"no-hub-{uuid.uuid4().hex}")
        failing = MetricsReporter("r", ROLE_DECODE, "chat", broken, period_s=0.01)
        failing.start()
        await asyncio.sleep(0.05)
        await failing.stop()
        return await missing.flush(), failing.pushes_ok == 0, failing.pushes_failed

    no_hub, none_ok, failures = asyncio.run(run())
    assert not no_hub and none_ok and failures >= 2


# ---- over Ray -------------------------------------------------------------------------------------------
async def _bounded(ref, timeout_s: float = 60.0):
    """Await an actor call, failing in seconds rather than hanging the suite when the actor never answers."""
    return await asyncio.wait_for(asyncio.wrap_future(ref.future()), timeout_s)


def test_reporter_pushes_to_the_hub_actor(ray_local) -> None:
    name = f"pdserve-metrics-test-{uuid.uuid4().hex[:8]}"
    hub = get_or_create_hub(name=name)
    ray = ray_local
    try:
        ray.get(hub.ready.remote(), timeout=60)
        calls = {"n": 0}
        ttft = Histogram.for_metric(TIME_TO_FIRST_TOKEN)

        async def collect() -> MetricsSnapshot:
            calls["n"] += 1
            ttft.observe(0.05)
            return _snap({GENERATION_TOKENS: calls["n"]}, {NUM_REQUESTS_RUNNING: 1, KV_BLOCKS_USED: 1,
                                                               KV_BLOCKS_TOTAL: 4},
                         {TIME_TO_FIRST_TOKEN: ttft.snapshot()})

        async def run() -> tuple[str, str, list, str]:
            reporter = MetricsReporter("decode-1", ROLE_DECODE, "chat", collect, period_s=0.05, hub_name=name)
            reporter.start()
            await asyncio.sleep(0.3)
            assert await reporter.flush()
            before = await _bounded(hub.render.remote())
            # The hub dies and Ray restarts it empty: the reporter finds it again and fills it back in.
            ray.kill(hub, no_restart=False)
            deadline = time.monotonic() + 60.0  # a restart on a loaded 2-core CI box can take a while
            while time.monotonic() < deadline:
                await asyncio.sleep(0.1)
                try:
                    if await _bounded(hub.sources.remote(), 10.0):
                        break
                except (ray.exceptions.RayActorError, TimeoutError):  # still restarting
                    pass
            after = await _bounded(hub.render.remote())
            await reporter.stop()  # final push, then forget: gauges go, counters stay
            return before, after, await _bounded(hub.sources.remote()), await _bounded(hub.render.remote())

        before, after, sources, stopped = asyncio.run(run())
        for text in (before, after):
            fams = _parse(text)
            assert _counter(fams, "generation_tokens", "chat") > 1
            assert _gauge(fams, "kv_cache_usage_perc", "chat") == 0.25
            ttft_count = _value(fams, "pdserve:time_to_first_token_seconds",
                                "pdserve:time_to_first_token_seconds_count", product="chat")
            assert ttft_count == _bucket(fams, TIME_TO_FIRST_TOKEN, "0.06", "chat") > 1
        assert [(s.source_id, s.role, s.product, s.live) for s in sources] == [("decode-1", "decode", "chat", False)]
        fams = _parse(stopped)
        assert _counter(fams, "generation_tokens", "chat") == calls["n"]
        assert _gauge(fams, "num_requests_running", "chat") == 0
    finally:
        ray.kill(hub, no_restart=True)

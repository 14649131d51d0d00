"""Cluster metrics: local histograms, the hub's per-product aggregation, rendering, and pushing over Ray."""

from __future__ import annotations

import asyncio
import math
import time
import uuid

import pytest
from prometheus_client.parser import text_string_to_metric_families

from cluster import metrics as m
from decode_workers.server import DecodeStats
from engine.outputs import EngineStats
from prefill_workers.server import PrefillStats


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _hist(name: str, *values: float) -> m.HistogramSnapshot:
    h = m.Histogram.for_metric(name)
    for v in values:
        h.observe(v)
    return h.snapshot()


def _snap(counters=None, gauges=None, histograms=None, labelled=None) -> m.MetricsSnapshot:
    return m.MetricsSnapshot(counters=dict(counters or {}), gauges=dict(gauges or {}),
                             histograms=dict(histograms or {}), labelled_counters=dict(labelled or {}))


def _parse(text: str) -> dict[str, object]:
    """family name -> Metric (prometheus_client's parser: proves the text is valid exposition)."""
    return {f.name: f for f in text_string_to_metric_families(text)}


def _value(families: dict, family: str, sample: str, **labels: str) -> float:
    matches = [s.value for s in families[family].samples if s.name == sample and s.labels == labels]
    assert len(matches) == 1, (family, sample, labels, families[family].samples)
    return matches[0]


def _counter(families: dict, name: str, product: str, **labels: str) -> float:
    return _value(families, m.PREFIX + name, m.PREFIX + name + "_total", product=product, **labels)


def _gauge(families: dict, name: str, product: str, **labels: str) -> float:
    return _value(families, m.PREFIX + name, m.PREFIX + name, product=product, **labels)


def _bucket(families: dict, name: str, le: str, product: str) -> float:
    return _value(families, m.PREFIX + name, m.PREFIX + name + "_bucket", le=le, product=product)


def _engine_stats(**overrides) -> EngineStats:
    fields = dict(num_blocks_total=100, num_blocks_free=75, kv_cache_usage=0.25, num_requests_running=3,
                  num_requests_waiting=2, num_requests_deferred=1, num_requests_held=0, prefix_cache_queries=640,
                  prefix_cache_hits=320, prompt_tokens_computed=400, prompt_tokens_cached=320, num_preemptions=1,
                  num_generated_tokens=90)
    fields.update(overrides)
    return EngineStats(**fields)


# ---- Histogram ----------------------------------------------------------------------------------------
def test_histogram_buckets_follow_prometheus_le() -> None:
    h = m.Histogram([0.1, 1.0])
    for v in (0.05, 0.1, 0.5, 1.0, 7.0, math.nan):
        h.observe(v)
    s = h.snapshot()
    assert s.bounds == (0.1, 1.0)
    assert s.bucket_counts == (2, 2, 1)  # a value equal to a bound is counted in that bound's bucket
    assert s.count == 5 and s.sum == pytest.approx(8.65)  # NaN ignored
    assert m.Histogram.for_metric(m.TIME_TO_FIRST_TOKEN).bounds == m.TTFT_BUCKETS


def test_histogram_snapshot_checks_and_merges() -> None:
    with pytest.raises(ValueError):
        m.HistogramSnapshot((1.0, 2.0), (1, 1), 1.0, 2)  # one count short of the +Inf bucket
    with pytest.raises(ValueError):
        m.HistogramSnapshot((2.0, 1.0), (0, 0, 0))  # bounds must increase
    with pytest.raises(ValueError):
        m.HistogramSnapshot((1.0,), (1, 1), 1.0, 3)  # count != sum of buckets
    a = m.HistogramSnapshot((0.1, 1.0), (1, 2, 3), 10.0, 6)
    b = m.HistogramSnapshot((0.05, 0.5, 5.0), (1, 1, 1, 1), 7.0, 4)
    total = a + b  # (0.05->0.1, 0.5->1.0, 5.0->+Inf): counts only move up
    assert total.bounds == a.bounds and total.bucket_counts == (2, 3, 5)
    assert total.count == 10 and total.sum == 17.0


def test_snapshot_rejects_bad_names() -> None:
    with pytest.raises(ValueError):
        m.MetricsSnapshot(counters={"pdserve:x": 1.0})
    with pytest.raises(ValueError):
        m.MetricsSnapshot(counters={"generation_tokens_total": 1.0})  # _total is added when rendering
    m.MetricsSnapshot(gauges={m.KV_BLOCKS_TOTAL: 1.0})  # a gauge may end in _total


# ---- aggregation --------------------------------------------------------------------------------------
def test_two_sources_are_summed_and_kv_usage_comes_from_blocks() -> None:
    hub = m.MetricsHub(clock=FakeClock())
    hub.report("d1", m.ROLE_DECODE, "chat", _snap(
        {m.PREFIX_CACHE_QUERIES: 100, m.GENERATION_TOKENS: 10},
        {m.NUM_REQUESTS_RUNNING: 2, m.KV_BLOCKS_USED: 3, m.KV_BLOCKS_TOTAL: 10},
        {m.TIME_TO_FIRST_TOKEN: _hist(m.TIME_TO_FIRST_TOKEN, 0.003, 0.3)},
        {m.REQUEST_SUCCESS: {"stop": 2}}))
    hub.report("d2", m.ROLE_DECODE, "chat", _snap(
        {m.PREFIX_CACHE_QUERIES: 50, m.GENERATION_TOKENS: 5},
        {m.NUM_REQUESTS_RUNNING: 1, m.KV_BLOCKS_USED: 5, m.KV_BLOCKS_TOTAL: 30},
        {m.TIME_TO_FIRST_TOKEN: _hist(m.TIME_TO_FIRST_TOKEN, 0.004, 5000.0)},
        {m.REQUEST_SUCCESS: {"stop": 1, "length": 4}}))
    hub.report("p1", m.ROLE_PREFILL, "chat", _snap({m.PREFIX_CACHE_QUERIES: 7}, {m.KV_BLOCKS_TOTAL: 10}))
    fams = _parse(hub.render())
    assert _counter(fams, "prefix_cache_queries", "chat") == 157
    assert _counter(fams, "generation_tokens", "chat") == 15
    assert _gauge(fams, "num_requests_running", "chat") == 3
    # 8 of 50 blocks, not the mean of 0.3, 0.1667 and 0.
    assert _gauge(fams, "kv_cache_usage_perc", "chat") == 0.16
    assert _counter(fams, m.REQUEST_SUCCESS, "chat", finished_reason="stop") == 3
    assert _counter(fams, m.REQUEST_SUCCESS, "chat", finished_reason="length") == 4
    assert _counter(fams, m.REQUEST_SUCCESS, "chat", finished_reason="abort") == 0
    assert _bucket(fams, m.TIME_TO_FIRST_TOKEN, "0.001", "chat") == 0
    assert _bucket(fams, m.TIME_TO_FIRST_TOKEN, "0.005", "chat") == 2  # cumulative, as exposed
    assert _bucket(fams, m.TIME_TO_FIRST_TOKEN, "0.5", "chat") == 3
    assert _bucket(fams, m.TIME_TO_FIRST_TOKEN, "2560.0", "chat") == 3
    assert _bucket(fams, m.TIME_TO_FIRST_TOKEN, "+Inf", "chat") == 4
    ttft = m.PREFIX + m.TIME_TO_FIRST_TOKEN
    assert _value(fams, ttft, ttft + "_count", product="chat") == 4
    assert _value(fams, ttft, ttft + "_sum", product="chat") == pytest.approx(5000.307)
    assert _gauge(fams, m.NUM_REPLICAS, "chat", role="decode") == 2
    assert _gauge(fams, m.NUM_REPLICAS, "chat", role="prefill") == 1


def test_stale_source_keeps_counters_but_loses_gauges() -> None:
    clock = FakeClock()
    hub = m.MetricsHub(stale_after_s=10.0, clock=clock)
    gauges = {m.NUM_REQUESTS_RUNNING: 4, m.NUM_REQUESTS_WAITING: 1, m.KV_BLOCKS_USED: 10, m.KV_BLOCKS_TOTAL: 10}
    hub.report("dead", m.ROLE_DECODE, "chat", _snap({m.GENERATION_TOKENS: 100}, gauges,
                                                      {m.E2E_REQUEST_LATENCY: _hist(m.E2E_REQUEST_LATENCY, 2.0)}))
    hub.report("alive", m.ROLE_DECODE, "chat", _snap({m.GENERATION_TOKENS: 1},
                                                       {m.NUM_REQUESTS_RUNNING: 1, m.KV_BLOCKS_TOTAL: 10}))
    clock.now += 11.0
    hub.report("alive", m.ROLE_DECODE, "chat", _snap({m.GENERATION_TOKENS: 2},
                                                       {m.NUM_REQUESTS_RUNNING: 1, m.KV_BLOCKS_TOTAL: 10}))
    fams = _parse(hub.render())
    assert _counter(fams, "generation_tokens", "chat") == 102
    assert _gauge(fams, "num_requests_running", "chat") == 1
    assert _gauge(fams, "num_requests_waiting", "chat") == 0
    assert _gauge(fams, "kv_cache_usage_perc", "chat") == 0.0
    e2e = m.PREFIX + m.E2E_REQUEST_LATENCY
    assert _value(fams, e2e, e2e + "_count", product="chat") == 1
    assert _gauge(fams, m.NUM_REPLICAS, "chat", role="decode") == 1
    live = {s.source_id: s.live for s in hub.sources()}
    assert live == {"alive": True, "dead": False}


def test_forget_drops_gauges_now_and_keeps_counters() -> None:
    hub = m.MetricsHub(clock=FakeClock())
    hub.report("ing", m.ROLE_INGRESS, "chat", _snap(labelled={m.REQUESTS_REJECTED: {"queue_full": 3}},
                                                    gauges={m.NUM_REQUESTS_WAITING: 5}))
    assert hub.forget("ing") == 1 and hub.forget("unknown") == 0
    fams = _parse(hub.render())
    assert _counter(fams, m.REQUESTS_REJECTED, "chat", reason="queue_full") == 3
    assert _gauge(fams, "num_requests_waiting", "chat") == 0
    hub.report("ing", m.ROLE_INGRESS, "chat", _snap(gauges={m.NUM_REQUESTS_WAITING: 2}))  # back after all
    fams = _parse(hub.render())
    assert _gauge(fams, "num_requests_waiting", "chat") == 2


def test_counters_stay_monotonic_when_a_source_restarts_or_retires() -> None:
    clock = FakeClock()
    hub = m.MetricsHub(stale_after_s=10.0, retire_after_s=100.0, clock=clock)

    def tokens() -> float:
        fams = _parse(hub.render())
        return _counter(fams, "generation_tokens", "chat")

    hub.report("d", m.ROLE_DECODE, "chat", _snap({m.GENERATION_TOKENS: 50, m.PREEMPTIONS: 2}))
    hub.report("d", m.ROLE_DECODE, "chat", _snap({m.GENERATION_TOKENS: 60}))  # a name gone is no restart
    assert tokens() == 60
    hub.report("d", m.ROLE_DECODE, "chat", _snap({m.GENERATION_TOKENS: 5}))  # same id, counting from zero
    assert tokens() == 65
    clock.now += 101.0
    assert tokens() == 65 and hub.sources() == []  # folded into the archive, still counted
    hub.report("d", m.ROLE_DECODE, "chat", _snap({m.GENERATION_TOKENS: 6}))  # a retired id is ignored
    assert tokens() == 65


def test_render_has_every_required_family_per_product() -> None:
    hub = m.MetricsHub(clock=FakeClock())
    engine = _engine_stats()
    hub.report("p", m.ROLE_PREFILL, "chat", m.snapshot_from_engine_stats(engine, count_generation=False))
    hub.report("d", m.ROLE_DECODE, "code", m.snapshot_from_engine_stats(engine))
    hub.report_many("i", m.ROLE_INGRESS, {"chat": _snap(), "code": _snap()})
    fams = _parse(hub.render())
    counters = ["prefix_cache_queries", "prefix_cache_hits", "prompt_tokens_computed", "prompt_tokens_cached",
                "kv_transfer_bytes", "kv_transfer_failures", "preemptions", "generation_tokens",
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
    prefill = m.snapshot_from_prefill_stats(PrefillStats("p", engine, exports_alive=2, directory_blocks_fetched=4,
                                                         directory_blocks_published=6, directory_errors=0))
    assert m.GENERATION_TOKENS not in prefill.counters  # the decode engine counts the first token too
    assert prefill.counters[m.PROMPT_TOKENS_CACHED] == 320
    assert prefill.counters[m.DIRECTORY_BLOCKS_FETCHED] == 4 and prefill.gauges[m.KV_EXPORTS_ALIVE] == 2
    assert prefill.gauges[m.KV_BLOCKS_USED] == 25 and prefill.gauges[m.KV_BLOCKS_TOTAL] == 100

    stats = DecodeStats("d", engine, kv_transfer_bytes=4096, kv_transfer_seconds=0.5, kv_transfer_failures=1,
                        prefill_failures=0, recomputed_prefills=1, remote_prefills=3)
    transfer = m.Histogram.for_metric(m.KV_TRANSFER_SECONDS)
    transfer.observe(0.002)
    decode = m.snapshot_from_decode_stats(stats, kv_transfer_seconds=transfer,
                                          labelled_counters={m.REQUEST_SUCCESS: {"stop": 3}})
    assert m.PROMPT_TOKENS_CACHED not in decode.counters  # the prefill worker counted those tokens
    assert decode.counters[m.GENERATION_TOKENS] == 90 and decode.counters[m.KV_TRANSFER_BYTES] == 4096
    assert decode.counters[m.KV_TRANSFER_FAILURES] == 1
    assert decode.histograms[m.KV_TRANSFER_SECONDS].count == 1
    assert decode.labelled_counters[m.REQUEST_SUCCESS] == {"stop": 3.0}
    assert m.snapshot_from_decode_stats(stats, local_prompt_tokens_cached=16).counters[m.PROMPT_TOKENS_CACHED] == 16
    colocated = m.snapshot_from_decode_stats(stats, disaggregated=False)
    assert colocated.counters[m.PROMPT_TOKENS_CACHED] == 320


def test_reporter_without_a_hub_never_raises() -> None:
    def broken() -> m.MetricsSnapshot:
        raise RuntimeError("stats unavailable")

    async def run() -> tuple[bool, bool, int]:
        missing = m.MetricsReporter("r", m.ROLE_DECODE, "chat", _snap, hub_name=f"no-hub-{uuid.uuid4().hex}")
        failing = m.MetricsReporter("r", m.ROLE_DECODE, "chat", broken, period_s=0.01)
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
    hub = m.get_or_create_hub(name=name)
    ray = ray_local
    try:
        ray.get(hub.ready.remote(), timeout=60)
        calls = {"n": 0}
        ttft = m.Histogram.for_metric(m.TIME_TO_FIRST_TOKEN)

        async def collect() -> m.MetricsSnapshot:
            calls["n"] += 1
            ttft.observe(0.05)
            return _snap({m.GENERATION_TOKENS: calls["n"]}, {m.NUM_REQUESTS_RUNNING: 1, m.KV_BLOCKS_USED: 1,
                                                               m.KV_BLOCKS_TOTAL: 4},
                         {m.TIME_TO_FIRST_TOKEN: ttft.snapshot()})

        async def run() -> tuple[str, str, list, str]:
            reporter = m.MetricsReporter("decode-1", m.ROLE_DECODE, "chat", collect, period_s=0.05, hub_name=name)
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
            assert ttft_count == _bucket(fams, m.TIME_TO_FIRST_TOKEN, "0.06", "chat") > 1
        assert [(s.source_id, s.role, s.product, s.live) for s in sources] == [("decode-1", "decode", "chat", False)]
        fams = _parse(stopped)
        assert _counter(fams, "generation_tokens", "chat") == calls["n"]
        assert _gauge(fams, "num_requests_running", "chat") == 0
    finally:
        ray.kill(hub, no_restart=True)

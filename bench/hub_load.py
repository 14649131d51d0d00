"""Where the one metrics hub stops keeping up: reports per second it absorbs, and what a scrape costs, as the
number of reporting replicas grows.

Every replica pushes a cumulative snapshot to the hub actor once per period (1 s), so a cluster of R replicas
offers R reports/s. This drives the real MetricsHub actor (cluster/metrics_hub.py) with realistic snapshots,
half a decode worker's (engine counters and gauges, the KV-transfer histogram) and half an ingress replica's
(TTFT, ITL and end-to-end histograms, labelled counters), from two sender actors at a rising offered rate,
each source reporting once a second as the reporters do. Per rate: the reports/s completed, the call latency
(P50/P99, send to done) and the hub process's CPU (cores); then the time of one /metrics render with that many
sources (Prometheus scrapes it every 15 s or so).

    python -m bench.hub_load [--rates 250 500 1000 2000 4000] [--seconds 10]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time

import psutil
import ray

from cluster.metric_names import (
    E2E_REQUEST_LATENCY,
    INTER_TOKEN_LATENCY,
    KV_TRANSFER_SECONDS,
    REQUEST_SUCCESS,
    ROLE_DECODE,
    ROLE_INGRESS,
    TIME_TO_FIRST_TOKEN,
)
from cluster.metric_snapshots import Histogram, MetricsSnapshot, snapshot_from_engine_stats
from cluster.metrics_hub import MetricsHub
from engine.outputs import EngineStats

SENDERS = 2


def _histogram(name: str, values: list[float]) -> Histogram:
    h = Histogram.for_metric(name)
    for v in values:
        h.observe(v)
    return h


def decode_snapshot() -> MetricsSnapshot:
    stats = EngineStats(num_blocks_total=4096, num_blocks_free=1024, kv_cache_usage=0.75, num_requests_running=48,
                        num_requests_waiting=3, num_requests_deferred=1, num_requests_held=0,
                        prefix_cache_queries=10**6, prefix_cache_hits=6 * 10**5, prompt_tokens_computed=4 * 10**5,
                        prompt_tokens_cached=6 * 10**5, num_preemptions=12, num_generated_tokens=3 * 10**6)
    transfer = _histogram(KV_TRANSFER_SECONDS, [0.001 * (i % 40) for i in range(500)])
    return snapshot_from_engine_stats(stats, histograms={KV_TRANSFER_SECONDS: transfer})


def ingress_snapshot() -> MetricsSnapshot:
    values = [0.01 * (i % 300) for i in range(2000)]
    return MetricsSnapshot(
        histograms={name: _histogram(name, values).snapshot()
                    for name in (TIME_TO_FIRST_TOKEN, INTER_TOKEN_LATENCY, E2E_REQUEST_LATENCY)},
        labelled_counters={REQUEST_SUCCESS: {"stop": 900.0, "length": 100.0, "abort": 3.0}})


@ray.remote(num_cpus=0)
class _Sender:
    """Sends reports for its share of the sources, each once per second, and times every call."""

    async def run(self, hub, first_source: int, sources: int, seconds: float,
                  snapshots: list[tuple[str, MetricsSnapshot]]) -> tuple[list[float], float]:
        """The call latencies (seconds) and this run's length, first send to last reply (seconds)."""
        latencies: list[float] = []
        pending: set[asyncio.Task] = set()
        gap = 1.0 / max(sources, 1)
        started = time.perf_counter()
        i = 0
        while True:
            due = started + i * gap
            if due - started >= seconds:
                break
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            source = first_source + i % sources
            role, snapshot = snapshots[source % len(snapshots)]
            task = asyncio.ensure_future(self._timed(hub, f"src-{source}", role, snapshot, latencies))
            pending.add(task)
            task.add_done_callback(pending.discard)
            i += 1
        if pending:
            await asyncio.wait(pending, timeout=60)
        return latencies, time.perf_counter() - started

    @staticmethod
    async def _timed(hub, source: str, role: str, snapshot: MetricsSnapshot, latencies: list[float]) -> None:
        sent = time.perf_counter()
        await hub.report.remote(source, role, "chat", snapshot)
        latencies.append(time.perf_counter() - sent)


def _hub_pid(hub) -> int:
    return ray.get(hub.__ray_call__.remote(lambda _self: os.getpid()), timeout=30)


def run_rate(hub, pid: int, senders: list, rate: int, seconds: float, snapshots) -> dict[str, float]:
    """rate reports/s offered: `rate` sources, each once a second, split over the senders."""
    share = rate // SENDERS
    cpu = psutil.Process(pid).cpu_times()
    results = ray.get([s.run.remote(hub, k * share, share, seconds, snapshots) for k, s in enumerate(senders)],
                      timeout=seconds + 120)
    after = psutil.Process(pid).cpu_times()
    wall = max(elapsed for _, elapsed in results)
    latencies = sorted(x for lat, _ in results for x in lat)
    hub_cpu_s = (after.user + after.system) - (cpu.user + cpu.system)
    return {"offered_per_s": share * SENDERS, "completed_per_s": len(latencies) / wall,
            "p50_ms": latencies[len(latencies) // 2] * 1e3, "p99_ms": latencies[int(len(latencies) * 0.99)] * 1e3,
            "hub_cores": hub_cpu_s / wall, "hub_ms_per_report": hub_cpu_s / max(len(latencies), 1) * 1e3}


def render_seconds(hub, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        ray.get(hub.render.remote(), timeout=120)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rates", type=int, nargs="+", default=[250, 500, 1000, 2000, 4000])
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args(argv)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    rows = []
    try:
        snapshots = [(ROLE_DECODE, decode_snapshot()), (ROLE_INGRESS, ingress_snapshot())]
        senders = [_Sender.remote() for _ in range(SENDERS)]
        ray.get([s.__ray_ready__.remote() for s in senders], timeout=60)
        for rate in args.rates:
            hub = ray.remote(num_cpus=0)(MetricsHub).remote(3600.0)  # a fresh hub per rate: `rate` sources
            pid = _hub_pid(hub)
            row = run_rate(hub, pid, senders, rate, args.seconds, snapshots)
            row["sources"] = len(ray.get(hub.sources.remote(), timeout=60))
            row["render_s"] = render_seconds(hub)
            rows.append(row)
            ray.kill(hub)
            print(json.dumps(row), flush=True)
    finally:
        ray.shutdown()
    print("| offered reports/s | completed/s | call P50 / P99 ms | hub cores | hub ms/report | sources | render s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['offered_per_s']} | {r['completed_per_s']:.0f} | {r['p50_ms']:.1f} / {r['p99_ms']:.1f} | "
              f"{r['hub_cores']:.2f} | {r['hub_ms_per_report']:.2f} | {r['sources']} | {r['render_s']:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

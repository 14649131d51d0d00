"""Control-plane load test: the real pdserve app (ingress, Serve proxy and controller, routers, prefix directory,
metrics hub, token streams) against N stand-in engine replicas (bench/standin_app.py; bench only).

    python -m bench.control_plane --replicas 2 8 32 --rates 10 20 40 80 --duration 20
    python -m bench.control_plane --quick          # N = 2, rates 5 and 10, 8 s each

Per N (half prefill, half decode replicas, one pool serving both products): a local Ray cluster with
`pdserve up`'s settings, the app deployed and its system prompts warmed; then `idle_s` seconds with no
load (the background: health checks, metrics pushes, routing stats, idle engine loops); then per rate an
open-loop Poisson run of short chat requests (the products' shared system prompt, user prompts and
answers scaled by --scale) through bench/load_client.py. The rates rise until a run falls behind (median
time to first token past 1 s, the chat product's target, or over 1% errors).

CPU seconds are read per process of the cluster (bench/process_cpu.py): the control plane is everything
but the engine replicas; the engine replicas' CPU (Serve plumbing, engine loop; a stand-in step sleeps)
is reported apart, and the load client (this process) apart again. "Marginal" CPU per request subtracts
the idle background at its measured rate.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from bench.process_cpu import ENGINES, cpu_delta, memory_by_component, own_cpu_s, snapshot
from bench.standin_app import PREFIX

QUICK = {"replicas": [2], "rates": [5.0, 10.0], "duration": 8.0, "idle": 5.0}
# A run has fallen behind (the control plane saturated) when its median time to first token passes the chat
# product's target (support-chat's slo.ttft_s), or over MAX_ERROR_FRACTION of its requests failed.
BEHIND_TTFT_S = 1.0
MAX_ERROR_FRACTION = 0.01
METRICS_PERIOD_S = 1.0  # every replica's push to the hub (cluster/metrics_reporter.py)


@dataclass(frozen=True)
class Run:
    """One rate against one N. Rates in requests/s, latencies in seconds, CPU in seconds."""

    replicas: int
    offered: float
    sent: int
    ok: int
    errors: Mapping[str, int]
    wall_s: float
    ttft_p50: float | None
    ttft_p99: float | None
    e2e_p50: float | None
    e2e_p99: float | None
    cpu_s: Mapping[str, float]  # component -> CPU seconds over the run (bench/process_cpu.py)
    client_cpu_s: float
    directory_calls: int  # prefix-directory lookups, contains and publish calls during the run (not feed polls)
    idle_cores: Mapping[str, float] = field(default_factory=dict)  # component -> cores busy with no load

    @property
    def achieved(self) -> float:
        return self.ok / self.wall_s

    def control_cpu_s(self) -> float:
        return sum(v for k, v in self.cpu_s.items() if k not in ENGINES)

    def control_ms_per_request(self, marginal: bool = False) -> float:
        """Control-plane CPU milliseconds per answered request; marginal: without the idle background."""
        background = sum(v for k, v in self.idle_cores.items() if k not in ENGINES) * self.wall_s if marginal else 0
        return 1000 * (self.control_cpu_s() - background) / max(self.ok, 1)

    def engines_ms_per_request(self) -> float:
        return 1000 * sum(v for k, v in self.cpu_s.items() if k in ENGINES) / max(self.ok, 1)

    def behind(self) -> bool:
        slow = self.ttft_p50 is None or self.ttft_p50 > BEHIND_TTFT_S
        return slow or self.sent - self.ok > MAX_ERROR_FRACTION * self.sent


@dataclass(frozen=True)
class Deployment:
    """One N's standing costs: idle cores per component, unique memory per component, hub sources."""

    replicas: int
    idle_cores: Mapping[str, float]
    memory: Mapping[str, tuple[int, int]]  # component -> (processes, unique bytes)
    hub_sources: int


def start_cluster(replicas: int, scale_cost: float) -> str:
    """A local Ray + Serve with the stand-in app of `replicas` engines (half each role); its base URL."""
    from bench.engine_standin import StandinCost
    from bench.standin_app import serve_standin_app, standin_products

    prefill = max(1, replicas // 2)
    products = standin_products(prefill, max(1, replicas - prefill))
    return serve_standin_app(products, StandinCost(time_scale=scale_cost), "cp")


def stop_cluster() -> None:
    from bench.standin_app import stop_standin_app

    stop_standin_app()


def measure_idle(replicas: int, idle_s: float) -> Deployment:
    """Cores each component keeps busy with no requests, over idle_s seconds, and the cluster's memory."""
    before = snapshot()
    time.sleep(idle_s)
    after = snapshot(memory=True)
    idle = {k: v / idle_s for k, v in cpu_delta(before, after).items()}
    return Deployment(replicas, idle, memory_by_component(after), _hub_sources())


def _hub_sources() -> int:
    import ray

    from cluster.metrics_hub import get_hub

    hub = get_hub()
    return len(ray.get(hub.sources.remote(), timeout=30)) if hub is not None else 0


def _directory_calls() -> int:
    import ray

    from cluster.prefix_directory import DIRECTORY_NAME, NAMESPACE

    directory = ray.get_actor(DIRECTORY_NAME, namespace=NAMESPACE)
    stats = ray.get(directory.stats.remote(), timeout=30)
    return stats.lookups + stats.contains_calls + stats.publish_calls


def run_rate(base_url: str, replicas: int, rate: float, args: argparse.Namespace, idle: Deployment) -> Run:
    """One open-loop run at `rate` requests/s for args.duration seconds, with its CPU accounting."""
    from bench.load_client import ChatSender, Endpoint
    from bench.load_dispatch import Limits
    from bench.load_stats import ALL, summarize
    from bench.prompt_text import model_tokenizer
    from bench.workload import Poisson, chat_requests, default_mix

    mix = default_mix(scale=args.scale)
    names = [p.name for p in mix.products]
    endpoint = Endpoint(base_url=base_url, models={n: PREFIX + n for n in names}, include_system=False,
                        read_timeout_s=60.0)
    requests = chat_requests(mix, Poisson(rate), args.seed, model_tokenizer("tiny"))
    limits = Limits(duration_s=args.duration, drain_s=30.0)
    lookups, before, client = _directory_calls(), snapshot(), own_cpu_s()
    sender = ChatSender(endpoint)
    result = asyncio.run(_send(requests, Poisson(rate), limits, sender))
    cpu = cpu_delta(before, snapshot())
    client_cpu, lookups = own_cpu_s() - client, _directory_calls() - lookups
    s = summarize(result.records, {}, result.wall_s).products[ALL]
    return Run(replicas, rate, s.sent, s.ok, s.errors, result.wall_s, s.ttft.p50, s.ttft.p99, s.e2e.p50, s.e2e.p99,
               cpu, client_cpu, lookups, idle.idle_cores)


async def _send(requests, arrival, limits, sender):
    from bench.load_dispatch import run_load

    try:
        return await run_load(requests, arrival, limits, sender)
    finally:
        await sender.aclose()


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{1000 * seconds:.0f}"


def runs_table(runs: list[Run]) -> str:
    """Markdown: one row per run."""
    head = ("| N | offered req/s | answered req/s | ok/sent | TTFT p50/p99 ms | e2e p50/p99 ms | control plane "
            "CPU ms/req (marginal) | engine replicas CPU ms/req | client CPU ms/req | directory calls/req |")
    rows = [head, "|" + "---|" * 10]
    for r in runs:
        rows.append(
            f"| {r.replicas} | {r.offered:g} | {r.achieved:.1f} | {r.ok}/{r.sent} "
            f"| {_ms(r.ttft_p50)}/{_ms(r.ttft_p99)} "
            f"| {_ms(r.e2e_p50)}/{_ms(r.e2e_p99)} | {r.control_ms_per_request():.1f} "
            f"({r.control_ms_per_request(marginal=True):.1f}) | {r.engines_ms_per_request():.1f} "
            f"| {1000 * r.client_cpu_s / max(r.ok, 1):.1f} | {r.directory_calls / max(r.ok, 1):.2f} |")
    return "\n".join(rows)


def components_table(runs: list[Run]) -> str:
    """Markdown: per run, CPU ms per answered request of each component."""
    names = sorted({k for r in runs for k in r.cpu_s})
    rows = ["| N | offered req/s | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 2)]
    for r in runs:
        cells = " | ".join(f"{1000 * r.cpu_s.get(n, 0.0) / max(r.ok, 1):.1f}" for n in names)
        rows.append(f"| {r.replicas} | {r.offered:g} | {cells} |")
    return "\n".join(rows)


def idle_table(deployments: list[Deployment]) -> str:
    """Markdown: per N, idle cores per component, hub sources and memory."""
    names = sorted({k for d in deployments for k in d.idle_cores})
    head = "| N | " + " | ".join(f"{n} idle cores" for n in names) + " | hub sources | processes | unique GiB |"
    rows = [head, "|" + "---|" * (len(names) + 4)]
    for d in deployments:
        cells = " | ".join(f"{d.idle_cores.get(n, 0.0):.3f}" for n in names)
        procs = sum(c for c, _ in d.memory.values())
        mem = sum(b for _, b in d.memory.values()) / (1 << 30)
        rows.append(f"| {d.replicas} | {cells} | {d.hub_sources} | {procs} | {mem:.2f} |")
    return "\n".join(rows)


def memory_lines(deployments: list[Deployment]) -> str:
    return "\n".join(f"N={d.replicas}: " + ", ".join(f"{k} {c} x {b / c / (1 << 20):.0f} MiB"
                                                      for k, (c, b) in sorted(d.memory.items()))
                     for d in deployments)


def run(args: argparse.Namespace) -> tuple[list[Deployment], list[Run]]:
    deployments, runs = [], []
    for n in args.replicas:
        try:
            url = start_cluster(n, args.time_scale)
            idle = measure_idle(n, args.idle)
            deployments.append(idle)
            for rate in args.rates:
                r = run_rate(url, n, rate, args, idle)
                runs.append(r)
                print(runs_table([r]).splitlines()[-1], flush=True)
                if r.behind():
                    break
        finally:
            stop_cluster()
    return deployments, runs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--replicas", type=int, nargs="+", default=[2, 8, 32], help="engine replicas N (half per role)")
    p.add_argument("--rates", type=float, nargs="+", default=[10.0, 20.0, 40.0, 80.0], help="offered requests/s")
    p.add_argument("--duration", type=float, default=20.0, help="seconds of sending per rate")
    p.add_argument("--idle", type=float, default=10.0, help="seconds of no load measured per N")
    p.add_argument("--scale", type=float, default=0.05, help="user prompt and answer lengths (bench/workload.py)")
    p.add_argument("--time-scale", type=float, default=1.0, help="stand-in step times x this (1: an H100)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help=f"a short run: {QUICK}")
    args = p.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    started = datetime.datetime.now().isoformat(timespec="seconds")
    deployments, runs = run(args)
    print(f"\n## Control plane against stand-in engines ({started}, {os.cpu_count()} CPUs)\n")
    print(runs_table(runs), "\n\nCPU ms per answered request, per component:\n", components_table(runs),
          "\n\nWith no load:\n", idle_table(deployments), "\n\n", memory_lines(deployments), sep="\n")
    return 0 if runs and any(r.ok for r in runs) else 1


if __name__ == "__main__":
    raise SystemExit(main())

"""Prefill and decode scaling apart under a load ramp, on load signals, with Serve's delays left in.

The real app (HTTP, ingress, routers, Serve's autoscaler running cluster/autoscaling.SignalPolicy) on
stand-in engines (bench/engine_standin.py: the real scheduler and KV pool, steps as long as the GPU cost
model says, times --time-scale so this host's control plane is not the bottleneck). Both roles start at
one replica and may grow to --max-replicas:
- prefill scales on queued prompt tokens (target --prefill-target per replica);
- decode scales on KV usage (target --decode-target per replica);
- Serve's own ongoing-requests rule is set high so that what moves each role is its signal.
Two phases, each a stepwise rate ramp: "prompts" (long user prompts, answers of 1-3 tokens: prefill load)
then "answers" (short prompts, answers of hundreds of tokens: decode load). Every second a sampler reads
each role's running replicas from Serve and the replicas' own load from the metrics hub (the decode
engines' KV usage, the prefill engines' waiting requests); the report gives, per window, the offered rate,
the replicas of each role, those loads, and the requests finished with their TTFT.

    python -m bench.autoscale_ramp [--quick] [--out results/autoscale_ramp.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.load_client import ChatSender, Endpoint
from bench.load_dispatch import Limits, run_load
from bench.load_stats import RequestRecord
from bench.workload import ChatMix, Poisson, ProductMix, chat_requests


@dataclass(frozen=True)
class Phase:
    """A rate ramp: `rates` requests/s, each for step_s seconds, of one product's requests."""

    name: str
    product: str
    user_tokens: tuple[int, int]
    output_tokens: tuple[int, int]
    rates: tuple[float, ...]


def phases(quick: bool) -> tuple[Phase, ...]:
    if quick:
        return (Phase("prompts", "support-chat", (1500, 2000), (1, 3), (1.0, 4.0)),
                Phase("answers", "report-gen", (20, 50), (300, 400), (0.3, 1.0)))
    return (Phase("prompts", "support-chat", (1500, 2000), (1, 3), (0.5, 1.5, 3.0, 4.0)),
            Phase("answers", "report-gen", (20, 50), (300, 400), (0.25, 0.5, 1.0, 2.0)))


@dataclass
class Timeline:
    """Samples of (seconds since start, prefill replicas, decode replicas, highest decode KV usage, most prefill
    requests waiting), taken by a thread."""

    samples: list[tuple[float, int, int, float, float]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)


def _running(status, app: str, suffix: str) -> int:
    deployments = status.applications[app].deployments
    name = next(n for n in deployments if n.endswith(suffix))
    return int(deployments[name].replica_states.get("RUNNING", 0))


def _engine_load(hub) -> tuple[float, float]:
    """The highest KV usage among decode engines and the most requests waiting at a prefill engine."""
    import ray

    from cluster.metric_names import KV_BLOCKS_TOTAL, KV_BLOCKS_USED, NUM_REQUESTS_WAITING

    sources = [s for s in ray.get(hub.sources.remote(), timeout=10) if s.live]
    usage = [s.gauges.get(KV_BLOCKS_USED, 0.0) / max(s.gauges.get(KV_BLOCKS_TOTAL, 1.0), 1.0)
             for s in sources if s.role == "decode"]
    waiting = [s.gauges.get(NUM_REQUESTS_WAITING, 0.0) for s in sources if s.role == "prefill"]
    return max(usage, default=0.0), max(waiting, default=0.0)


def sample_replicas(timeline: Timeline, t0: float, app: str = "pdserve", period_s: float = 1.0) -> None:
    from ray import serve

    from cluster.metrics_hub import get_hub

    while not timeline.stop.wait(period_s):
        try:
            status = serve.status()
            usage, waiting = _engine_load(get_hub())
            timeline.samples.append((time.perf_counter() - t0, _running(status, app, "-prefill"),
                                     _running(status, app, "-decode"), usage, waiting))
        except Exception:  # the controller or hub busy or restarting: a gap in the timeline, not a failed run
            continue


def start_cluster(args: argparse.Namespace) -> str:
    """A local Ray + Serve with the stand-in app, both roles autoscaled on their signals; its base URL."""
    from bench.engine_standin import StandinCost
    from bench.standin_app import serve_standin_app, standin_products
    from cluster.products import Autoscaling

    def scaled(signals: dict[str, float]) -> Autoscaling:
        return Autoscaling(min_replicas=1, max_replicas=args.max_replicas, initial_replicas=1,
                           target_ongoing_requests=1000, upscale_delay_s=args.upscale_delay,
                           downscale_delay_s=args.downscale_delay, look_back_period_s=5, signals=signals)

    products = {}
    for name, p in standin_products(1, 1).items():
        prefill = p.prefill.model_copy(update={"autoscaling": scaled({"queued_prompt_tokens": args.prefill_target})})
        decode = p.decode.model_copy(update={"autoscaling": scaled({"kv_usage": args.decode_target})})
        engine = {**p.engine, "num_kv_blocks": args.kv_blocks}
        products[name] = p.model_copy(update={"prefill": prefill, "decode": decode, "engine": engine})
    return serve_standin_app(products, StandinCost(time_scale=args.time_scale), "ramp")


async def drive(base_url: str, plan: tuple[Phase, ...], step_s: float,
                seed: int) -> list[tuple[str, float, RequestRecord]]:
    """Every step of every phase in turn, each step an open-loop run of step_s seconds started on time (the
    previous step's requests keep running); (phase, offered rate, record) per request."""
    from bench.prompt_text import model_tokenizer
    from bench.standin_app import PREFIX
    from bench.workload import default_mix

    systems = {p.name: p.system_prompt for p in default_mix().products}
    tokenizer = model_tokenizer("tiny")
    sender = ChatSender(Endpoint(base_url=base_url, models={n: PREFIX + n for n in systems}, include_system=False,
                                 read_timeout_s=300.0))
    runs = []
    try:
        step = 0
        for phase in plan:
            mix = ChatMix(products=(ProductMix(phase.product, 1.0, systems[phase.product], phase.output_tokens),),
                          user_tokens=phase.user_tokens)
            for rate in phase.rates:
                requests = chat_requests(mix, Poisson(rate), seed + step, tokenizer)
                runs.append((phase.name, rate, asyncio.create_task(
                    run_load(requests, Poisson(rate), Limits(duration_s=step_s, drain_s=600.0), sender))))
                step += 1
                await asyncio.sleep(step_s)
        results = [(name, rate, await task) for name, rate, task in runs]
    finally:
        await sender.aclose()
    return [(name, rate, record) for name, rate, result in results for record in result.records]


def windows(timeline: Timeline, records: list[tuple[str, float, RequestRecord]], plan: tuple[Phase, ...],
            step_s: float) -> list[dict]:
    """One row per step: offered rate, the most replicas of each role seen in it, requests ok, TTFT p50."""
    rows = []
    steps = [(phase.name, rate) for phase in plan for rate in phase.rates]
    for i, (name, rate) in enumerate(steps):
        lo, hi = i * step_s, (i + 1) * step_s
        seen = [sample[1:] for sample in timeline.samples if lo <= sample[0] < hi]
        done = [r for n, q, r in records if (n, q) == (name, rate) and r.ok]
        ttfts = [r.ttft_s for r in done if r.ttft_s is not None]
        rows.append({"phase": name, "from_s": lo, "rate": rate,
                     "prefill_replicas": max((x[0] for x in seen), default=0),
                     "decode_replicas": max((x[1] for x in seen), default=0),
                     "decode_kv_usage_max": max((x[2] for x in seen), default=0.0),
                     "prefill_waiting_max": max((x[3] for x in seen), default=0.0),
                     "ok": len(done), "sent": sum(1 for n, q, _ in records if (n, q) == (name, rate)),
                     "ttft_p50_ms": statistics.median(ttfts) * 1e3 if ttfts else None})
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| phase | from s | offered req/s | prefill replicas | most requests waiting at a prefill engine | "
             "decode replicas | highest decode KV usage | ok/sent | TTFT p50 ms |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ttft = "-" if r["ttft_p50_ms"] is None else f"{r['ttft_p50_ms']:.0f}"
        lines.append(f"| {r['phase']} | {r['from_s']:.0f} | {r['rate']:g} | {r['prefill_replicas']} | "
                     f"{r['prefill_waiting_max']:.0f} | {r['decode_replicas']} | {r['decode_kv_usage_max']:.2f} | "
                     f"{r['ok']}/{r['sent']} | {ttft} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="two steps per phase")
    parser.add_argument("--step", type=float, default=45.0, help="seconds per rate step")
    parser.add_argument("--time-scale", type=float, default=10.0, help="stand-in step time x this")
    parser.add_argument("--max-replicas", type=int, default=3)
    parser.add_argument("--prefill-target", type=float, default=2000.0, help="queued prompt tokens per replica")
    parser.add_argument("--decode-target", type=float, default=0.5, help="KV usage per replica")
    parser.add_argument("--kv-blocks", type=int, default=512, help="KV blocks per stand-in engine")
    parser.add_argument("--upscale-delay", type=float, default=10.0)
    parser.add_argument("--downscale-delay", type=float, default=30.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    from bench.standin_app import stop_standin_app

    plan = phases(args.quick)
    try:
        base_url = start_cluster(args)
        timeline = Timeline()
        t0 = time.perf_counter()
        sampler = threading.Thread(target=sample_replicas, args=(timeline, t0), daemon=True)
        sampler.start()
        records = asyncio.run(drive(base_url, plan, args.step, args.seed))
        timeline.stop.set()
        sampler.join(timeout=10)
    finally:
        stop_standin_app()
    rows = windows(timeline, records, plan, args.step)
    print(table(rows))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"args": vars(args) | {"out": str(args.out)}, "rows": rows,
                                        "timeline": timeline.samples}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

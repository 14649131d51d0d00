"""Overload soak: far more concurrent streams than the queues hold, against a detached pdserve.

    pdserve up --detach
    python -m bench.soak --concurrency 200 --duration 60 --out results/soak
    pdserve down

What it shows (issue 6): past its queue a product answers 429 with Retry-After instead of taking the
request (and memory); every accepted request completes or ends with a clear error; the resident memory
of the whole cluster (every process of the detached Ray session, sampled every 0.5 s) stays within
what it held idle plus a stated margin (the KV pools are allocated at start, so load must not grow
them); afterwards no request, block, export or lease remains (cluster/invariants.py). Targets
127.0.0.1 only; bounded by --duration and --drain.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import threading
from collections import Counter
from pathlib import Path

import psutil
import ray

from bench.load_bench import add_arguments, plan_from_args, run_plan
from bench.load_client import ChatSender, Endpoint, require_local
from bench.load_stats import OK
from cluster.cli import DETACHED_TEMP_DIR, STATE_FILE
from cluster.invariants import wait_cluster_idle
from cluster.metrics import get_hub
from cluster.prefix_directory import DIRECTORY_NAME, NAMESPACE

MiB = 1 << 20


def session_rss_bytes(marker: str = DETACHED_TEMP_DIR) -> int:
    """Resident bytes of every process of the Ray session started with `marker` in its command line,
    and all of their descendants (workers, replicas)."""
    roots = [p for p in psutil.process_iter(["cmdline"]) if marker in " ".join(p.info["cmdline"] or ())]
    seen: dict[int, psutil.Process] = {}
    for root in roots:
        try:
            for proc in [root, *root.children(recursive=True)]:
                seen[proc.pid] = proc
        except psutil.NoSuchProcess:
            continue
    total = 0
    for proc in seen.values():
        try:
            total += proc.memory_info().rss
        except psutil.NoSuchProcess:
            continue
    return total


class RssSampler:
    """Samples session_rss_bytes() in a thread until stopped; keeps the peak (bytes)."""

    def __init__(self, period_s: float = 0.5) -> None:
        self.period_s, self.peak, self._stop = period_s, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, session_rss_bytes())
            self._stop.wait(self.period_s)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    parser.add_argument("--rss-margin-mib", type=float, default=1024,
                        help="allowed growth of the cluster's resident memory over its idle level")
    parser.set_defaults(concurrency=200, duration=60.0, drain=120.0, scale=0.1, out="results/soak", no_progress=True)
    args = parser.parse_args()
    state = json.loads(STATE_FILE.read_text())
    if args.base_url == parser.get_default("base_url"):
        args.base_url = f"{state['url']}/v1"
    require_local(args.base_url)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(address=state["address"], namespace=NAMESPACE, log_to_driver=False)
    try:
        idle_rss = session_rss_bytes()
        plan = plan_from_args(args)
        endpoint = Endpoint(base_url=args.base_url, models=plan.models, api_keys={}, default_api_key=args.api_key,
                            include_system=plan.include_system)
        with RssSampler() as rss:
            result = asyncio.run(run_plan(plan, ChatSender(endpoint), progress=False))
        directory = ray.get_actor(DIRECTORY_NAME, namespace=NAMESPACE)
        leftovers = wait_cluster_idle(get_hub(), directory, timeout_s=60)
    finally:
        ray.shutdown()
    outcomes = Counter(r.outcome for r in result.records)
    report = {
        "concurrency": args.concurrency, "duration_s": args.duration, "scale": args.scale,
        "sent": len(result.records), "outcomes": dict(outcomes),
        "rejected_429_with_retry_after": sum(r.outcome == "429" and r.retry_after_s is not None
                                             for r in result.records),
        "idle_rss_mib": idle_rss / MiB, "peak_rss_mib": rss.peak / MiB,
        "rss_growth_mib": (rss.peak - idle_rss) / MiB, "rss_margin_mib": args.rss_margin_mib,
        "leftovers_after": leftovers, "wall_s": result.wall_s,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "soak.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    accepted_failed = sum(n for o, n in outcomes.items() if o not in (OK, "429"))
    within = report["rss_growth_mib"] <= args.rss_margin_mib
    return 0 if within and not leftovers and accepted_failed == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())

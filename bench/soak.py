"""Overload soak: far more concurrent streams than the queues hold, against a detached pdserve.

    pdserve up --detach
    python -m bench.soak --concurrency 200 --duration 60 --out results/soak
    pdserve down

What it shows: past its queue a product answers 429 with Retry-After instead of taking the
request (and memory); every accepted request completes or ends with a clear error; the memory (PSS)
of the processes serving at idle stays within what they held idle plus a stated margin (the KV pools
are allocated and zeroed at start, so load must not grow them), sampled every 0.5 s over every process
of the detached Ray session, with replicas that autoscaling adds reported beside it; afterwards no
request, block, export or lease remains (cluster/invariants.py). Targets 127.0.0.1 only; bounded by
--duration and --drain.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import psutil

from bench.load_bench import add_arguments, plan_from_args, run_plan
from bench.load_client import ChatSender, Endpoint, require_local
from bench.load_stats import OK
from cluster.cli_state import reach, read_state
from cluster.detached_head import detached_temp_dir

# Nothing above imports Ray: reach() must set Ray's authentication settings before Ray is first imported.

MiB = 1 << 20


def session_memory(marker: str | None = None) -> dict[int, tuple[str, int]]:
    """pid -> (process title, proportional set size in bytes) of every process of the Ray session started
    with `marker` (default: the temp dir of the head `up --detach` starts) in its command line and all
    their descendants (workers, replicas).

    PSS, not RSS: pages several processes map (Ray's object store, shared libraries) are split among
    them instead of counted once per process, so the sum is the memory the cluster really holds."""
    marker = marker or str(detached_temp_dir())
    roots = [p for p in psutil.process_iter(["cmdline"]) if marker in " ".join(p.info["cmdline"] or ())]
    seen: dict[int, psutil.Process] = {}
    for root in roots:
        try:
            for proc in [root, *root.children(recursive=True)]:
                seen[proc.pid] = proc
        except psutil.NoSuchProcess:
            continue
    out = {}
    for pid, proc in seen.items():
        try:
            out[pid] = (" ".join(proc.cmdline()[:1])[:70], proc.memory_full_info().pss)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return out


class MemorySampler:
    """Samples session_memory() in a thread until stopped; keeps the sample with the largest total."""

    def __init__(self, period_s: float = 0.5) -> None:
        self.period_s, self.peak, self.peak_by_process = period_s, 0, {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            sample = session_memory()
            total = sum(pss for _, pss in sample.values())
            if total > self.peak:
                self.peak, self.peak_by_process = total, sample
            self._stop.wait(self.period_s)


def memory_growth(idle: dict[int, tuple[str, int]], peak: dict[int, tuple[str, int]]) -> dict[str, Any]:
    """Idle -> peak, split into processes alive at idle (what load made them hold) and processes started
    since (autoscaled replicas, Ray workers: each a whole process). MiB."""
    grew = {pid: (title, pss - idle[pid][1]) for pid, (title, pss) in peak.items() if pid in idle}
    new = {pid: (title, pss) for pid, (title, pss) in peak.items() if pid not in idle}
    top = sorted(grew.items(), key=lambda kv: -kv[1][1])[:5]
    return {
        "existing_processes_mib": sum(d for _, d in grew.values()) / MiB,
        "existing_largest_mib": {f"{title} [{pid}]": d / MiB for pid, (title, d) in top},
        "new_processes": len(new),
        "new_processes_mib": sum(pss for _, pss in new.values()) / MiB,
        "new_process_titles": sorted(title for title, _ in new.values()),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    parser.add_argument("--margin-mib", type=float, default=1024,
                        help="allowed growth (PSS) of the processes serving at idle; replicas that autoscaling "
                             "adds are reported beside it, bounded by max_replicas")
    parser.set_defaults(concurrency=200, duration=60.0, drain=120.0, scale=0.1, out="results/soak", no_progress=True)
    args = parser.parse_args()
    state = read_state()
    if args.base_url == parser.get_default("base_url"):
        args.base_url = f"{state['url']}/v1"
    require_local(args.base_url)
    reach(state)  # with the Ray authentication settings `up` used
    import ray

    from cluster.invariants import wait_cluster_idle
    from cluster.metrics_hub import get_hub
    from cluster.prefix_directory import DIRECTORY_NAME, NAMESPACE

    try:
        idle = session_memory()
        idle_total = sum(pss for _, pss in idle.values())
        plan = plan_from_args(args)
        endpoint = Endpoint(base_url=args.base_url, models=plan.models, api_keys={}, default_api_key=args.api_key,
                            include_system=plan.include_system)
        with MemorySampler() as memory:
            result = asyncio.run(run_plan(plan, ChatSender(endpoint), progress=False))
        try:
            directory = ray.get_actor(DIRECTORY_NAME, namespace=NAMESPACE)
        except ValueError:  # no disaggregated product with prefix caching: the cluster has no directory
            directory = None
        leftovers = wait_cluster_idle(get_hub(), directory, timeout_s=60)
    finally:
        ray.shutdown()
    outcomes = Counter(r.outcome for r in result.records)
    report = {
        "concurrency": args.concurrency, "duration_s": args.duration, "scale": args.scale,
        "sent": len(result.records), "outcomes": dict(outcomes),
        "rejected_429_with_retry_after": sum(r.outcome == "429" and r.retry_after_s is not None
                                             for r in result.records),
        "idle_pss_mib": idle_total / MiB, "peak_pss_mib": memory.peak / MiB,
        "pss_growth_mib": (memory.peak - idle_total) / MiB, "margin_mib": args.margin_mib,
        "growth": memory_growth(idle, memory.peak_by_process),
        "leftovers_after": leftovers, "wall_s": result.wall_s,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "soak.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    accepted_failed = sum(n for o, n in outcomes.items() if o not in (OK, "429"))
    # Autoscaled replicas are bounded by the products' max_replicas (a deployment choice); what load
    # itself must not do is grow the processes that were already serving.
    within = report["growth"]["existing_processes_mib"] <= args.margin_mib
    return 0 if within and not leftovers and accepted_failed == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())

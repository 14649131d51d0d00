"""Hardening under load: overload, extreme requests and a decode replica kill at once, against a detached
pdserve.

    pdserve up --detach
    python -m bench.hardening --concurrency 32 --duration 60 --out results/hardening
    pdserve down

For --duration seconds, side by side:
- load: the two-product mix at --concurrency streams (bench/load_bench.py's plan, as bench/soak.py);
- extremes: requests at the edges of what the API takes (bench/extreme_requests.py), one after another,
  each answer checked: well-formed, or a 4xx with a message;
- at --kill-at seconds: one live decode replica of --kill-product killed, as a crashed node would be.
A 5xx (or an error event in a stream) is expected only within --kill-window seconds after the kill.
Afterwards the idle invariants must hold (cluster/invariants.py: nothing running or waiting, no KV block
or export held, nothing in flight and no token stream open on the ingress). Exit 0 when no request
failed outside the kill window and nothing leaked. Targets 127.0.0.1 only; bounded by --duration and
--drain.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bench.extreme_requests import answer_problem, random_request, send
from bench.load_bench import add_arguments, plan_from_args, run_plan
from bench.load_client import ChatSender, Endpoint, require_local
from bench.load_stats import OK
from cluster.cli_state import reach, read_state

# Nothing above imports Ray: reach() must set Ray's authentication settings before Ray is first imported.

VOCAB = 8192  # prompt token ids below this are valid for every model pdserve ships (tiny: 8,192; SmolLM2: 49,152)


class Extremes(threading.Thread):
    """Sends extreme requests one after another until stopped; records (seconds from start, status, problem)."""

    def __init__(self, base: str, products: list[str], api_key: str, seed: int, start: float) -> None:
        super().__init__(name="extremes", daemon=True)
        self.base, self.products, self.api_key, self.start_s = base, products, api_key, start
        self.rng = random.Random(seed)
        self.stop = threading.Event()
        self.records: list[tuple[float, int, str | None]] = []

    def run(self) -> None:
        while not self.stop.is_set():
            path, _, body = random_request(self.rng, self.products, VOCAB)
            sent = time.monotonic() - self.start_s
            try:
                status, raw = send(self.base, path, self.api_key, body)
                problem = answer_problem(body, status, raw)
            except (OSError, ValueError) as exc:  # connection refused or reset, an unparsable answer
                status, problem = 0, f"{type(exc).__name__}: {exc}"
            self.records.append((sent, status, problem))


def _kill_a_decode_replica(product: str) -> str:
    """Kill one live decode replica of product (found by the id it reports metrics under); its id."""
    import ray

    from cluster.metrics_hub import get_hub

    sources = [s for s in ray.get(get_hub().sources.remote(), timeout=60)
               if s.role == "decode" and s.product == product and s.live]
    if not sources:
        raise RuntimeError(f"no live decode replica of {product} to kill")
    victim = sources[0].source_id
    ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)  # a replica actor is named by its id
    return victim


def _in_window(t: float, kill_at: float | None, window_s: float) -> bool:
    return kill_at is not None and kill_at <= t <= kill_at + window_s


def _hit_by_kill(sent_s: float, e2e_s: float | None, kill_at: float | None, window_s: float) -> bool:
    """A load request the kill may have ended: sent before the window closed, not finished before the kill
    (e2e_s None: it never finished)."""
    if kill_at is None or sent_s > kill_at + window_s:
        return False
    return e2e_s is None or sent_s + e2e_s >= kill_at


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    parser.add_argument("--kill-at", type=float, default=20.0, help="seconds into the run; negative: no kill")
    parser.add_argument("--kill-product", default="support-chat")
    parser.add_argument("--kill-window", type=float, default=60.0,
                        help="seconds after the kill in which 5xx and stream errors are expected")
    parser.set_defaults(concurrency=32, duration=60.0, drain=120.0, scale=0.1, out="results/hardening",
                        no_progress=True)
    args = parser.parse_args()
    state = read_state()
    if args.base_url == parser.get_default("base_url"):
        args.base_url = f"{state['url']}/v1"
    require_local(args.base_url)
    reach(state)
    import ray

    from cluster.invariants import wait_cluster_idle
    from cluster.metrics_hub import get_hub
    from cluster.prefix_directory import DIRECTORY_NAME, NAMESPACE

    plan = plan_from_args(args)
    endpoint = Endpoint(base_url=args.base_url, models=plan.models, api_keys={}, default_api_key=args.api_key,
                        include_system=plan.include_system)
    start = time.monotonic()
    extremes = Extremes(args.base_url.removesuffix("/v1"), sorted(plan.models), args.api_key, args.seed, start)
    killed: dict[str, Any] = {}

    def kill() -> None:
        if args.kill_at < 0 or extremes.stop.wait(args.kill_at):
            return
        killed["at_s"] = time.monotonic() - start
        killed["replica"] = _kill_a_decode_replica(args.kill_product)

    killer = threading.Thread(target=kill, name="kill", daemon=True)
    try:
        extremes.start()
        killer.start()
        result = asyncio.run(run_plan(plan, ChatSender(endpoint), progress=False))
        extremes.stop.set()
        extremes.join(timeout=180)
        killer.join(timeout=60)
        try:
            directory = ray.get_actor(DIRECTORY_NAME, namespace=NAMESPACE)
        except ValueError:
            directory = None
        leftovers = wait_cluster_idle(get_hub(), directory, timeout_s=60)
    finally:
        ray.shutdown()
    kill_at, window = killed.get("at_s"), args.kill_window
    load_failed = [r for r in result.records if r.outcome not in (OK, "429")]
    load_failed_outside = [r for r in load_failed if not _hit_by_kill(r.sent_s, r.e2e_s, kill_at, window)]
    classes = Counter(f"{status // 100}xx" if status else "no answer" for _, status, _ in extremes.records)
    problems = [(t, status, p) for t, status, p in extremes.records if p is not None]
    outside = [(round(t, 1), status, p) for t, status, p in problems if not _in_window(t, kill_at, window)]
    report = {
        "concurrency": args.concurrency, "duration_s": args.duration, "kill": killed, "kill_window_s": window,
        "load": {"sent": len(result.records), "outcomes": dict(Counter(r.outcome for r in result.records)),
                 "failed_outside_kill_window": len(load_failed_outside)},
        "extremes": {"sent": len(extremes.records), "by_class": dict(classes),
                     "problems_in_kill_window": len(problems) - len(outside),
                     "problems_outside_kill_window": outside[:20]},
        "leftovers_after": leftovers, "wall_s": time.monotonic() - start,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "hardening.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return 0 if not load_failed_outside and not outside and not leftovers else 1


if __name__ == "__main__":
    raise SystemExit(main())

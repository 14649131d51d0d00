"""Prefix-lookup benchmark: what asking "does the cluster hold this prefix?" costs per request.

Three measurements in one run, on one local Ray instance:
1. The directory actor, asked as the request path used to ask it: a `lookup` of a 14-hash chain (a
   220-token system prompt in 16-token blocks), one call at a time (latency) and 64 in flight (the one
   actor's ceiling), median over repeats.
2. The same question answered by a prefill worker's local index (PrefixIndex.leading_run), which the
   request path now reads instead: lookups per second on one core.
3. End to end: two real PrefillServer actors (the tiny model) and the real directory serve requests
   that share a system prompt after one worker warmed it; the directory's own counters give its calls per
   request on the request path (lookups, contains, publishes) and the change feed's polls.

    python -m bench.prefix_lookup [--repeats 5] [--requests 64] [--out results/prefix_lookup.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import ray

from cluster.prefix_directory import PrefixDirectory
from engine.block_hash import extra_keys, hash_full_blocks
from engine.config import SamplingParams
from prefill_workers.prefix_index import PrefixIndex
from prefill_workers.protocol import PrefillRequest
from prefill_workers.server import PrefillServer

BLOCK = 16
SYSTEM_TOKENS = 220
CHAIN = 14  # hashes per lookup: a 224-token prefix in 16-token blocks
IN_FLIGHT = 64


def _chain(seed: int) -> list[bytes]:
    tokens = [(seed * 7919 + i * 104729) % 8000 + 3 for i in range(CHAIN * BLOCK + 1)]
    return hash_full_blocks(tokens, BLOCK, extra_keys("", None))[:CHAIN]


def actor_lookups(directory, chain: list[bytes], calls: int) -> dict[str, float]:
    """Sequential latency (ms per call) and the rate with IN_FLIGHT calls outstanding (calls/s)."""
    ray.get(directory.lookup.remote(chain), timeout=60)
    started = time.perf_counter()
    for _ in range(calls):
        ray.get(directory.lookup.remote(chain), timeout=60)
    sequential = (time.perf_counter() - started) / calls
    started = time.perf_counter()
    pending = [directory.lookup.remote(chain) for _ in range(IN_FLIGHT)]
    done = 0
    while done < calls * 4:
        ready, pending = ray.wait(pending, num_returns=1, timeout=60)
        done += len(ready)
        pending.append(directory.lookup.remote(chain))
    ray.get(pending, timeout=60)
    concurrent = (done + len(pending)) / (time.perf_counter() - started)
    return {"ms_per_call": sequential * 1e3, "calls_per_s_64_in_flight": concurrent}


def index_lookups(chain: list[bytes], calls: int) -> dict[str, float]:
    """The local index's leading_run over the same chain (the directory's state mirrored)."""
    index = PrefixIndex()
    index.note_published(chain)
    started = time.perf_counter()
    for _ in range(calls):
        assert index.leading_run(chain) == CHAIN
    elapsed = time.perf_counter() - started
    return {"us_per_lookup": elapsed / calls * 1e6, "lookups_per_s": calls / elapsed}


def end_to_end(directory, requests: int) -> dict[str, float]:
    """Directory calls per request while two real prefill workers serve prompts sharing a system prompt."""
    worker = ray.remote(num_cpus=0.5, max_concurrency=64)(PrefillServer)
    prefills = [worker.remote(None, {"transport": "ray"}, directory, worker_id=f"bench-{i}") for i in range(2)]
    system = [(i * 37) % 8000 + 3 for i in range(SYSTEM_TOKENS)]
    params = SamplingParams(temperature=0.0, max_tokens=1)
    try:
        ray.get(prefills[0].warm_prefix.remote(system), timeout=300)
        before = ray.get(directory.stats.remote(), timeout=60)
        seconds = []
        for i in range(requests):
            prompt = system + [(i * 131 + j) % 8000 + 3 for j in range(40)]
            result = ray.get(prefills[i % 2].prefill.remote(PrefillRequest(f"r{i}", prompt, params)), timeout=300)
            ray.get(prefills[i % 2].release_kv.remote(result.kv.export_id), timeout=60)
            seconds.append(result.prefill_seconds)
        after = ray.get(directory.stats.remote(), timeout=60)
    finally:
        for p in prefills:
            ray.kill(p)
    calls = {name: getattr(after, name) - getattr(before, name)
             for name in ("lookups", "contains_calls", "publish_calls", "change_polls")}
    return {"requests": requests, **{f"{k}_per_request": v / requests for k, v in calls.items()},
            "request_path_calls_per_request": (calls["lookups"] + calls["contains_calls"]) / requests,
            "prefill_ms_p50": statistics.median(seconds) * 1e3}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--calls", type=int, default=500, help="actor calls per repeat")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        directory = ray.remote(num_cpus=0)(PrefixDirectory).remote(256 << 20)
        chain = _chain(1)
        actor = [actor_lookups(directory, chain, args.calls) for _ in range(args.repeats)]
        index = [index_lookups(chain, args.calls * 200) for _ in range(args.repeats)]
        e2e = end_to_end(directory, args.requests)
    finally:
        ray.shutdown()
    med = {key: statistics.median(r[key] for r in rows) for rows in (actor, index) for key in rows[0]}
    report = {"repeats": args.repeats, "chain_hashes": CHAIN, **med,
              "index_vs_actor_rate": med["lookups_per_s"] / med["calls_per_s_64_in_flight"], "end_to_end": e2e}
    print(json.dumps(report, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

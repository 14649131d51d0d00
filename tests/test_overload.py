"""Overload: twice as many concurrent streams as a product's queue holds, for a bounded time.

Past the queue the ingress answers 429 with Retry-After (no engine work, no memory); every accepted
request completes; afterwards no request, block or export remains anywhere (cluster/invariants.py).
The long soak with resident-memory figures is bench/soak.py (numbers in BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import asyncio
from collections import Counter

from bench.load_bench import add_arguments, plan_from_args, run_plan
from bench.load_client import ChatSender, Endpoint
from bench.load_stats import OK
from cluster.invariants import wait_cluster_idle
from cluster.metrics_hub import get_hub


def test_overload_gets_429s_accepted_requests_complete_and_nothing_remains(pdserve_url: str) -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    # support-chat's queue is 24 in the test app: 48 closed-loop clients keep it over-full for 8 s.
    args = parser.parse_args(["--base-url", f"{pdserve_url}/v1", "--concurrency", "48", "--duration", "8",
                              "--drain", "60", "--scale", "0.05", "--mix", "support-chat=1", "--seed", "3"])
    plan = plan_from_args(args)
    endpoint = Endpoint(base_url=args.base_url, models=plan.models, api_keys={}, default_api_key="unused",
                        include_system=plan.include_system)
    records = asyncio.run(run_plan(plan, ChatSender(endpoint), progress=False)).records
    outcomes = Counter(r.outcome for r in records)
    assert outcomes[OK] > 0 and outcomes["429"] > 0, outcomes
    assert set(outcomes) == {OK, "429"}, outcomes  # nothing accepted was lost or failed
    assert all(r.retry_after_s == 1 for r in records if r.outcome == "429")
    assert all(r.output_tokens > 0 for r in records if r.ok)
    problems = wait_cluster_idle(get_hub(), timeout_s=30, products=("support-chat",))
    assert not problems, problems

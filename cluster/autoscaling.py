"""Autoscaling on what predicts SLO misses, not only on ongoing requests.

Serve's own rule sizes a deployment by ongoing requests per replica. That lags for LLM engines: a prefill
replica with four 2,000-token prompts queued is far busier than one with four 20-token prompts, and a decode
replica near a full KV pool will preempt before its request count looks high. Each worker replica reports
signals (Serve's `record_autoscaling_stats`, the names in SIGNALS); SignalPolicy asks, for every signal the
product configures, how many replicas would bring the per-replica value to its target:

    desired = sum over replicas of the signal / target per replica

and takes the largest of those and of Serve's own rule. Serve then applies the deployment's bounds, scaling
factors and up/down delays to it, as for its default policy (custom policies are wrapped the same way).
"""

from __future__ import annotations

import math
from typing import Any

from ray.serve.autoscaling_policy import replica_queue_length_autoscaling_policy
from ray.serve.config import AutoscalingContext

from engine.outputs import EngineStats

# Signal name -> what it measures (per replica), and where an engine's stats give it.
SIGNALS = {
    "queued_prompt_tokens": "prompt tokens waiting to be computed (prefill load to come)",
    "kv_usage": "fraction of KV blocks in use (decode headroom)",
    "decode_step_s": "recent duration of a decoding step, i.e. inter-token latency, seconds",
}


def engine_signals(stats: EngineStats) -> dict[str, float]:
    """The SIGNALS of one engine, as a replica reports them to Serve."""
    return {"queued_prompt_tokens": float(stats.num_waiting_prompt_tokens), "kv_usage": stats.kv_cache_usage,
            "decode_step_s": stats.recent_decode_step_s}


class SignalPolicy:
    """A Serve autoscaling policy (class-callable; Serve instantiates it with policy_kwargs).

    targets: signal name (SIGNALS) -> the per-replica value to scale towards. The policy state it returns
    records each signal's desired replica count (Serve keeps it per deployment; tests and operators read it).
    """

    def __init__(self, targets: dict[str, float]) -> None:
        unknown = set(targets) - set(SIGNALS)
        if unknown:
            raise ValueError(f"unknown autoscaling signals {sorted(unknown)}; known: {sorted(SIGNALS)}")
        if any(not (isinstance(t, int | float) and t > 0 and math.isfinite(t)) for t in targets.values()):
            raise ValueError(f"autoscaling signal targets must be finite and > 0, got {targets}")
        self.targets = dict(targets)

    def __call__(self, ctx: AutoscalingContext) -> tuple[float, dict[str, Any]]:
        desired, _ = replica_queue_length_autoscaling_policy(ctx)
        wanted = {"ongoing_requests": float(desired)}
        metrics = ctx.aggregated_metrics or {}
        for name, target in self.targets.items():
            values = metrics.get(name) or {}
            if values:
                wanted[name] = sum(values.values()) / target
        return max(wanted.values()), {"wanted_replicas": wanted}

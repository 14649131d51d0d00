"""Autoscaling on load signals (cluster/autoscaling.py): the policy's arithmetic against Serve's own context,
and a prefill deployment that scales on queued prompt tokens while its request count (and its decode
deployment) would not move Serve's default rule.

The scaling test runs its own small application ("signals", under /signals), bounded: 8 streams for at most
90 s, 127.0.0.1 only.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
from ray import serve
from ray.serve._private.common import DeploymentID, ReplicaID
from ray.serve.config import AutoscalingConfig, AutoscalingContext

from cluster.app import build_app
from cluster.autoscaling import SIGNALS, SignalPolicy, engine_signals
from cluster.products import Autoscaling
from engine.outputs import EngineStats
from tests.cluster_helpers import tiny_products

APP = "signals"
DEPLOYMENT = DeploymentID(name="d", app_name="a")


def _context(metrics: dict[str, list[float]], ongoing: float, replicas: int) -> AutoscalingContext:
    ids = [ReplicaID(unique_id=f"r{i}", deployment_id=DEPLOYMENT) for i in range(replicas)]
    return AutoscalingContext(
        deployment_id=DEPLOYMENT, deployment_name="d", app_name="a", current_num_replicas=replicas,
        target_num_replicas=replicas, running_replicas=ids, total_num_requests=ongoing, total_queued_requests=0,
        aggregated_metrics={name: dict(zip(ids, values, strict=True)) for name, values in metrics.items()},
        raw_metrics={}, capacity_adjusted_min_replicas=1, capacity_adjusted_max_replicas=8, policy_state={},
        last_scale_up_time=None, last_scale_down_time=None, current_time=time.time(),
        config=AutoscalingConfig(min_replicas=1, max_replicas=8, target_ongoing_requests=4))


def test_the_policy_takes_the_most_replicas_any_signal_asks_for() -> None:
    policy = SignalPolicy({"queued_prompt_tokens": 1000, "kv_usage": 0.8})
    # 2 replicas, 2 ongoing requests (Serve alone: 0.5 replicas), 4,000 queued tokens (4), KV 0.9 + 0.7 (2)
    ctx = _context({"queued_prompt_tokens": [3000, 1000], "kv_usage": [0.9, 0.7]}, ongoing=2, replicas=2)
    desired, state = policy(ctx)
    assert desired == pytest.approx(4.0)
    assert state["wanted_replicas"] == pytest.approx({"ongoing_requests": 0.5, "queued_prompt_tokens": 4.0,
                                                      "kv_usage": 2.0})
    quiet = _context({"queued_prompt_tokens": [0, 0], "kv_usage": [0.1, 0.1]}, ongoing=16, replicas=2)
    assert policy(quiet)[0] == pytest.approx(4.0)  # Serve's own rule: 16 requests / 4 per replica
    assert policy(_context({}, ongoing=2, replicas=2))[0] == pytest.approx(0.5)  # no report yet: Serve's rule


@pytest.mark.parametrize("targets, message", [({"gpu_temperature": 1.0}, "unknown"), ({"kv_usage": 0}, "> 0"),
                                              ({"kv_usage": float("inf")}, "finite")])
def test_bad_signal_targets_are_refused_when_the_product_loads(targets: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Autoscaling(signals=targets)


def test_engine_stats_give_every_signal() -> None:
    stats = EngineStats(num_blocks_total=10, num_blocks_free=4, kv_cache_usage=0.6, num_requests_running=1,
                        num_requests_waiting=2, num_requests_deferred=0, num_requests_held=0, prefix_cache_queries=0,
                        prefix_cache_hits=0, prompt_tokens_computed=0, prompt_tokens_cached=0, num_preemptions=0,
                        num_generated_tokens=0, num_waiting_prompt_tokens=700, recent_decode_step_s=0.05)
    assert engine_signals(stats) == {"queued_prompt_tokens": 700.0, "kv_usage": 0.6, "decode_step_s": 0.05}
    assert set(engine_signals(stats)) == set(SIGNALS)


def _replicas(deployment: str) -> int:
    app = serve.status().applications[APP]
    return sum(n for state, n in app.deployments[deployment].replica_states.items() if state in ("RUNNING", "STARTING"))


def test_prefill_scales_on_queued_prompt_tokens_and_decode_does_not(pdserve_url: str) -> None:
    """Serve's rule alone would keep both at one replica (100 ongoing requests per replica as the target);
    prefill also has a queued-prompt-tokens target of 1 token per replica, which long prompts exceed."""
    base = tiny_products()["support-chat"]
    lazy = {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 100, "upscale_delay_s": 1,
            "downscale_delay_s": 600, "look_back_period_s": 2}
    product = base.model_copy(update={
        "name": APP, "cache_salt": APP, "engine": {**base.engine, "max_num_batched_tokens": 64},
        "prefill": base.prefill.model_copy(update={"autoscaling": Autoscaling(
            **lazy, signals={"queued_prompt_tokens": 1})}),
        "decode": base.decode.model_copy(update={"autoscaling": Autoscaling(**lazy)}),
    })
    serve.run(build_app({APP: product}, token_stream_host="127.0.0.1"), name=APP, route_prefix=f"/{APP}")
    try:
        client = openai.OpenAI(base_url=f"{pdserve_url}/{APP}/v1", api_key="none", max_retries=0, timeout=120)
        stop = threading.Event()
        prompt = " ".join(f"item {i} of the quarterly usage ledger," for i in range(60))  # ~500 tokens

        def send_until_stopped(i: int) -> int:
            done = 0
            while not stop.is_set():
                client.completions.create(model=APP, prompt=f"{i} {done} {prompt}", max_tokens=2, temperature=0)
                done += 1
            return done

        prefill, decode = f"{APP}-prefill", f"{APP}-decode"
        with ThreadPoolExecutor(max_workers=8) as pool:
            futures = [pool.submit(send_until_stopped, i) for i in range(8)]
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline and _replicas(prefill) < 2:
                time.sleep(0.5)
            peak = _replicas(prefill)
            stop.set()
            completed = sum(f.result(timeout=180) for f in futures)
        assert peak == 2, "prefill did not scale on queued prompt tokens"
        assert _replicas(decode) == 1, "decode scaled although nothing asked it to"
        assert completed > 0
    finally:
        serve.delete(APP)

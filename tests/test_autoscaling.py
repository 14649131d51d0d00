"""Decode replicas scale up under a bounded load on 127.0.0.1 and back down when it stops.

support-chat's decode deployment (test settings in conftest: 1 to 3 replicas, 2 ongoing requests per
replica as the target, 1 s upscale and 4 s downscale delays) gets 12 concurrent streams for at most 60 s.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import openai
from ray import serve

DEPLOYMENT = "support-chat-decode"


def _replicas() -> int:
    """Replicas the autoscaler wants: running ones plus those it is starting (a start takes ~10-30 s here)."""
    app = serve.status().applications["pdserve"]
    return sum(n for state, n in app.deployments[DEPLOYMENT].replica_states.items()
               if state in ("RUNNING", "STARTING"))


def test_decode_scales_up_under_load_and_back_down(pdserve_url: str) -> None:
    client = openai.OpenAI(base_url=f"{pdserve_url}/v1", api_key="unused", max_retries=0, timeout=120)
    assert _replicas() == 1
    stop = threading.Event()

    def stream_until_stopped(_: int) -> int:
        done = 0
        while not stop.is_set():
            for _chunk in client.chat.completions.create(
                    model="support-chat", messages=[{"role": "user", "content": "Write a long answer."}],
                    max_tokens=200, temperature=0, stream=True, extra_body={"ignore_eos": True}):
                pass
            done += 1
        return done

    peak = 1
    with ThreadPoolExecutor(max_workers=12) as pool:
        futures = [pool.submit(stream_until_stopped, i) for i in range(12)]
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and peak < 2:
            time.sleep(1)
            peak = max(peak, _replicas())
        stop.set()
        completed = sum(f.result(timeout=180) for f in futures)
    assert peak >= 2, "decode replicas never scaled up under load"
    assert completed > 0
    deadline = time.monotonic() + 90
    while _replicas() > 1 and time.monotonic() < deadline:
        time.sleep(1)
    assert _replicas() == 1, "decode replicas did not scale back down after the load stopped"

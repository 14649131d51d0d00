"""Start pdserve workers as Ray actors for tests, drive them, and check the cluster invariants."""

from __future__ import annotations

import ray

from cluster.prefix_directory import DIRECTORY_NAME, get_or_create_directory
from decode_workers.server import DecodeServer
from engine.config import SamplingParams
from prefill_workers.server import PrefillServer

TIMEOUT_S = 120


def start_prefill(transfer: dict | None = None, engine: dict | None = None, directory: bool | str = True,
                  resources: dict | None = None, worker_id: str | None = None):
    """directory: True for the cluster's directory, a name for another one, False for none."""
    actor = ray.remote(num_cpus=0.5, max_concurrency=64, resources=resources or {})(PrefillServer)
    name = DIRECTORY_NAME if directory is True else directory or None
    return actor.remote(engine, transfer, name, worker_id=worker_id)


def start_decode(prefill, transfer: dict | None = None, engine: dict | None = None, resources: dict | None = None):
    actor = ray.remote(num_cpus=0.5, max_concurrency=64, resources=resources or {})(DecodeServer)
    return actor.remote(engine, transfer, prefill)


def start_directory(capacity_bytes: int = 256 << 20):
    directory = get_or_create_directory(capacity_bytes)
    ray.get(directory.ready.remote(), timeout=TIMEOUT_S)
    return directory


def generate(decode, prompt: list[int], params: SamplingParams, request_id: str | None = None,
             cache_salt: str | None = None) -> dict:
    """Run one request through a DecodeServer actor; returns the last StepOutput dict plus all tokens."""
    request = {"request_id": request_id, "prompt_token_ids": prompt, "sampling_params": params,
               "cache_salt": cache_salt}
    tokens: list[int] = []
    last = None
    for ref in decode.generate.options(num_returns="streaming").remote(request):
        last = ray.get(ref, timeout=TIMEOUT_S)
        tokens.extend(last["new_token_ids"])
    return {**last, "token_ids": tokens}


def assert_idle(prefills=(), decodes=()) -> None:
    """No request state, no held block, no export anywhere: every block free on every worker."""
    for worker in [*prefills, *decodes]:
        stats = ray.get(worker.stats.remote(), timeout=TIMEOUT_S)
        e = stats.engine
        assert e.num_blocks_free == e.num_blocks_total, f"{stats.worker_id}: blocks leaked"
        assert e.num_requests_running == e.num_requests_waiting == 0, stats.worker_id
        assert e.num_requests_deferred == e.num_requests_held == 0, stats.worker_id
        if hasattr(stats, "exports_alive"):
            assert stats.exports_alive == 0, f"{stats.worker_id}: exports stranded"


def kill_all(*actors) -> None:
    for actor in actors:
        try:
            ray.kill(actor, no_restart=True)
        except Exception:
            pass

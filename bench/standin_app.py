"""The real pdserve app (ingress, routers, prefix directory, metrics hub, token streams) on stand-in engines.

Bench only: the worker classes here run bench/engine_standin.StandinEngine, which answers with made-up
tokens. They reach build_app through its `workers` argument, which no product file or CLI option sets.

standin_products(): deploy/products' two products, their system prompts and limits kept, moved onto one
shared pool of stand-in engines (the tiny model's tokenizer and KV layout) with a fixed replica count per
role and a small CPU reservation each, so many replicas fit on a small host.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ray.serve import Application

from bench.engine_standin import DEFAULT_COST, STANDIN_MODEL, StandinCost, StandinEngine
from cluster.app import DEFAULT_PRODUCTS_DIR, build_app
from cluster.deployments import DecodeDeployment, PrefillDeployment, WorkerClasses
from cluster.ingress_config import DEFAULT_INGRESS, IngressConfig
from cluster.products import Autoscaling, ProductConfig, Role, load_products
from engine.async_engine import AsyncEngine
from engine.config import EngineConfig

POOL = "standin"
PREFIX = "standin-"  # every stand-in product's name starts with it: its model names and metrics say what they are
# Its own prefix-cache namespace: the stand-in's KV blocks hold zeros, never to be found by a real engine
# sharing the prefix directory (same model, same system prompt).
CACHE_SALT = "standin-engines"
# Per engine, GPU-like limits (bench/incident_sim.py's H100 runs 1,024 seats); the KV pool is kept small in
# host memory (2,048 blocks of 16 tokens, 16 MiB in the tiny layout) since the load's prompts are short.
STANDIN_ENGINE: dict[str, Any] = {"block_size": 16, "num_kv_blocks": 2048, "max_num_seqs": 256,
                                  "max_num_batched_tokens": 8192}
REPLICA_CPUS = 0.01  # a Ray reservation, not a limit: what lets 32 replicas be placed on 2 cores


class _StandinEngines:
    """Mixed in before a deployed worker class: its engine loop runs a StandinEngine priced by `standin_cost`."""

    def __init__(self, *args: Any, standin_cost: StandinCost = DEFAULT_COST, **kwargs: Any) -> None:
        self._standin_cost = standin_cost  # before the worker's __init__, which builds the engine
        super().__init__(*args, **kwargs)

    def _make_engine(self, config: EngineConfig) -> AsyncEngine:
        cost = self._standin_cost
        return AsyncEngine(config, build=lambda c: StandinEngine(c, cost))


class StandinPrefill(_StandinEngines, PrefillDeployment):
    pass


class StandinDecode(_StandinEngines, DecodeDeployment):
    pass


def standin_workers(cost: StandinCost = DEFAULT_COST) -> WorkerClasses:
    return WorkerClasses(StandinPrefill, StandinDecode, {"standin_cost": cost})


def standin_products(prefill_replicas: int, decode_replicas: int, max_queue_len: int = 1024,
                     products_dir: Path = DEFAULT_PRODUCTS_DIR) -> dict[str, ProductConfig]:
    """The shipped products, renamed PREFIX + name, on one pool of stand-in engines: prefill_replicas and
    decode_replicas fixed (no autoscaling), REPLICA_CPUS each, in CACHE_SALT's prefix namespace.
    max_queue_len: in-flight requests before 429, split across the ingress replicas. Keyed by the new names."""
    pool = {"model": STANDIN_MODEL, "pool": POOL, "cache_salt": CACHE_SALT, "engine": STANDIN_ENGINE,
            "transfer": {"transport": "ray"}, "prefill": _role(prefill_replicas), "decode": _role(decode_replicas),
            "max_queue_len": max_queue_len}
    products = (p.model_copy(update={**pool, "name": PREFIX + p.name}) for p in load_products(products_dir).values())
    return {p.name: p for p in products}


def _role(replicas: int) -> Role:
    fixed = Autoscaling(min_replicas=replicas, max_replicas=replicas, initial_replicas=replicas)
    return Role(autoscaling=fixed, num_cpus=REPLICA_CPUS, max_ongoing_requests=1024)


def build_standin_app(products: dict[str, ProductConfig], cost: StandinCost = DEFAULT_COST,
                      ingress: IngressConfig = DEFAULT_INGRESS) -> Application:
    """The pdserve app for `products` with stand-in engines, token streams on loopback (one host)."""
    return build_app(products, ingress, token_stream_host="127.0.0.1", workers=standin_workers(cost))


def serve_standin_app(products: dict[str, ProductConfig], cost: StandinCost, temp_tag: str) -> str:
    """Start a local Ray + Serve (its own temp dir, /tmp/pdserve-<temp_tag>-<pid>; HTTP on a free loopback
    port) running the stand-in app for `products`, warmed; its OpenAI base URL. stop_standin_app() ends it."""
    import os
    import socket

    import ray
    from ray import serve

    from cluster.cli import LOCAL_ENV

    for key, value in LOCAL_ENV.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(address="local", num_cpus=4, include_dashboard=False, namespace="pdserve", log_to_driver=False,
             _temp_dir=f"/tmp/pdserve-{temp_tag}-{os.getpid()}")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    handle = serve.run(build_standin_app(products, cost), name="pdserve", route_prefix="/")
    handle.warm.remote().result(timeout_s=600)
    return f"http://127.0.0.1:{port}/v1"


def stop_standin_app() -> None:
    import ray
    from ray import serve

    if ray.is_initialized():
        serve.shutdown()
        ray.shutdown()

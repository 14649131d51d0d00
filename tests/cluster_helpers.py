"""Start pdserve workers as Ray actors for tests, drive them, and check the cluster invariants."""

from __future__ import annotations

from pathlib import Path

import ray
import yaml

from cluster.app import DEFAULT_PRODUCTS_DIR
from cluster.prefix_directory import DIRECTORY_NAME, get_or_create_directory
from cluster.products import ProductConfig, load_products
from decode_workers.server import DecodeServer
from engine.config import SamplingParams
from prefill_workers.server import PrefillServer

TIMEOUT_S = 120
# What the serving-layer tests run on: a fixed shape and speed. The shipped model (SmolLM2) runs in
# tests/test_real_model.py, tests/test_cli.py and tests/test_deploy_configs.py.
TEST_MODEL = "tiny"
TEST_KV_CACHE_BYTES = 128 << 20


def tiny_products() -> dict[str, ProductConfig]:
    """deploy/products as shipped, but on the built-in tiny model with 128 MiB of KV per engine."""
    return {name: p.model_copy(update={"model": TEST_MODEL,
                                       "engine": {**p.engine, "kv_cache_bytes": TEST_KV_CACHE_BYTES}})
            for name, p in load_products(DEFAULT_PRODUCTS_DIR).items()}


def write_serve_config(directory: Path, products: dict[str, ProductConfig]) -> Path:
    """A Serve config (directory/serve.yaml) of the pdserve app built from `products`, one file each in
    directory/products, as `pdserve up --config` and `serve run` take it."""
    folder = directory / "products"
    folder.mkdir()
    for name, product in products.items():
        (folder / f"{name}.yaml").write_text(yaml.safe_dump(product.model_dump(mode="json")))
    config = directory / "serve.yaml"
    config.write_text(yaml.safe_dump({"applications": [{
        "name": "pdserve", "route_prefix": "/", "import_path": "cluster.app:app_builder",
        "args": {"products_dir": str(folder)}}]}))
    return config


def start_prefill(transfer: dict | None = None, engine: dict | None = None, directory: bool | str = True,
                  resources: dict | None = None, worker_id: str | None = None):
    """directory: True for the cluster's directory, a name for another one, False for none."""
    actor = ray.remote(num_cpus=0.5, max_concurrency=64, resources=resources or {})(PrefillServer)
    name = DIRECTORY_NAME if directory is True else directory or None
    return actor.remote(engine, transfer, name, worker_id=worker_id)


def start_decode(prefill, transfer: dict | None = None, engine: dict | None = None, resources: dict | None = None,
                 **kwargs):
    """kwargs: DecodeServer's keyword arguments (local_prefill_max_tokens, ...)."""
    actor = ray.remote(num_cpus=0.5, max_concurrency=64, resources=resources or {})(DecodeServer)
    return actor.remote(engine, transfer, prefill, **kwargs)


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

"""Builds the Ray Serve application from the product configs.

Per pool (a product's own, or one that several products name): a
PrefillServer deployment (prefix-affinity routed) and a DecodeServer
deployment (KV-headroom routed), each with its own autoscaling.
One OpenAI ingress deployment in front (autoscaled from the app's `ingress`
settings, cluster/ingress_config.py) routes by the request's `model`. The prefix
directory and the metrics hub are named actors the workers find by name.

`serve run deploy/serve.yaml` calls `app_builder(args)`; `pdserve up` calls
`build_app(products)` directly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ray import serve
from ray.serve import Application
from ray.serve.config import RequestRouterConfig

from cluster.autoscaling import SignalPolicy
from cluster.deployments import SERVING_WORKERS, WorkerClasses
from cluster.http_edge import BODY_READ_TIMEOUT_S
from cluster.ingress import TOKEN_STREAM_MODES, OpenAIIngress
from cluster.ingress_config import DEFAULT_INGRESS, IngressConfig
from cluster.prefix_directory import DIRECTORY_NAME
from cluster.products import Autoscaling, ProductConfig, Role, load_products, pools
from cluster.routing import KVHeadroomRouter, PrefixAffinityRouter
from decode_workers.token_stream import TokenStreamSecurity
from engine.models import resolve as resolve_model

DEFAULT_PRODUCTS_DIR = Path(__file__).resolve().parent.parent / "deploy" / "products"


def _autoscaling_config(scaling: Autoscaling) -> dict[str, Any]:
    """Serve's autoscaling_config of a deployment scaled by `scaling`."""
    autoscaling = {
        "min_replicas": scaling.min_replicas, "max_replicas": scaling.max_replicas,
        "target_ongoing_requests": scaling.target_ongoing_requests,
        "upscale_delay_s": scaling.upscale_delay_s, "downscale_delay_s": scaling.downscale_delay_s,
        "look_back_period_s": scaling.look_back_period_s,
        # Deprecated in Serve 2.60 in favour of the push-interval environment variables, but without it
        # Serve compares look_back_period_s with its 10 s default and warns; keep both at 1 s.
        "metrics_interval_s": 1.0,
    }
    if scaling.initial_replicas is not None:
        autoscaling["initial_replicas"] = scaling.initial_replicas
    if scaling.signals:
        autoscaling["policy"] = {"policy_function": SignalPolicy, "policy_kwargs": {"targets": dict(scaling.signals)}}
    return autoscaling


def _deployment_options(name: str, role: Role, router: type, health_period_s: float = 2.0) -> dict[str, Any]:
    actor = {"num_cpus": role.num_cpus, "num_gpus": role.num_gpus}
    if role.resources:
        actor["resources"] = dict(role.resources)
    return {
        "name": name, "ray_actor_options": actor, "max_ongoing_requests": role.max_ongoing_requests,
        "autoscaling_config": _autoscaling_config(role.autoscaling), "health_check_period_s": health_period_s,
        "request_router_config": RequestRouterConfig(request_router_class=router,
                                                     request_routing_stats_period_s=1.0),
    }


def _engine(product: ProductConfig, role: Role) -> dict[str, Any]:
    return product.engine_config(role).__dict__.copy()


def build_app(products: dict[str, ProductConfig], ingress: IngressConfig = DEFAULT_INGRESS,
              token_stream: str = "direct", body_timeout_s: float = BODY_READ_TIMEOUT_S,
              token_stream_host: str | None = None, token_stream_security: dict | None = None,
              workers: WorkerClasses = SERVING_WORKERS) -> Application:
    """token_stream: how decode workers send outputs to the ingress, "direct" or "serve" (cluster/ingress.py).
    token_stream_host: the address the ingress's token streams listen on (None: its node's; loopback suits
    a one-node cluster, which then exposes nothing of pdserve's on the network).
    token_stream_security: TokenStreamSecurity fields (decode_workers/token_stream.py): TLS files, or
    allow_plaintext. Beyond loopback, direct streams without either fall back to "serve".
    body_timeout_s: seconds a request body may take to arrive (slower: 408).
    ingress: the ingress deployment's autoscaling and size; every product's max_queue_len holds across all
    its replicas (split, cluster/admission_split.py).
    workers: the deployed worker classes; serving keeps the default (the real engines)."""
    ingress.check_products(products)
    if token_stream not in TOKEN_STREAM_MODES:
        raise ValueError(f"token_stream must be one of {TOKEN_STREAM_MODES}, not {token_stream!r}")
    TokenStreamSecurity(**(token_stream_security or {}))  # bad settings fail here, not in every replica
    for model in {p.model for p in products.values()}:
        resolve_model(model)  # build or convert it here, once, not in every replica at the same time
    decoders, prefills = {}, {}
    for name, members in pools(products).items():
        product = members[0]  # the pool's products agree on everything the deployments are built from
        transfer = product.transfer_config().__dict__.copy()
        prefill = None
        # Prefix caching off turns off the cluster-wide layer too: nothing is looked up or published.
        directory = DIRECTORY_NAME if product.prefix_caching else None
        if product.disaggregated:
            prefill = serve.deployment(workers.prefill).options(
                **_deployment_options(f"{name}-prefill", product.prefill, PrefixAffinityRouter),
            ).bind(_engine(product, product.prefill), transfer, directory, product=name,
                   cpu_affinity=product.prefill.cpu_affinity, **workers.kwargs)
        decoder = serve.deployment(workers.decode).options(
            **_deployment_options(f"{name}-decode", product.decode, KVHeadroomRouter),
        ).bind(_engine(product, product.decode), transfer, prefill, product=name,
               cpu_affinity=product.decode.cpu_affinity, local_prefill_max_tokens=product.local_prefill_max_tokens,
               kv_streaming=product.kv_streaming, **workers.kwargs)
        for member in members:
            decoders[member.name] = decoder
            if prefill is not None:
                prefills[member.name] = prefill
    return serve.deployment(OpenAIIngress).options(
        name="ingress", autoscaling_config=_autoscaling_config(ingress.autoscaling),
        ray_actor_options={"num_cpus": ingress.num_cpus}, max_ongoing_requests=ingress.max_ongoing_requests,
        health_check_period_s=2.0,
    ).bind({n: p.model_dump() for n, p in products.items()}, decoders, prefills, token_stream, body_timeout_s,
           token_stream_host, token_stream_security)


def app_builder(args: dict[str, Any]) -> Application:
    """Entry point for Serve config files: args {"products_dir": path (relative to the repo or absolute),
    "ingress": IngressConfig fields ({"autoscaling": {"min_replicas", "max_replicas",
    "target_ongoing_requests", ...}}), "token_stream": "direct" | "serve", "body_timeout_s": seconds,
    "token_stream_host": address, "token_stream_security": {tls_cert_file, tls_key_file, tls_ca_file,
    tls_server_name, allow_plaintext}}."""
    if "ingress_replicas" in args:
        raise ValueError("ingress_replicas is gone: set ingress.autoscaling.min_replicas and max_replicas")
    directory = Path(args.get("products_dir") or DEFAULT_PRODUCTS_DIR)
    if not directory.is_absolute() and not directory.exists():
        directory = DEFAULT_PRODUCTS_DIR.parent.parent / directory
    return build_app(load_products(directory), IngressConfig(**(args.get("ingress") or {})),
                     str(args.get("token_stream", "direct")),
                     float(args.get("body_timeout_s", BODY_READ_TIMEOUT_S)), args.get("token_stream_host"),
                     args.get("token_stream_security"))

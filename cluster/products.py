"""Per-product deployment configs (deploy/products/*.yaml), validated with pydantic.

A product is what the OpenAI `model` field names: its model folder, system
prompt, cache salt (its prefix-cache namespace: by default one per model and
system prompt, so products that share both share the prompt's cached blocks
and it is computed once for the cluster; a product that must not share names
its own salt), output limits, SLOs, API keys, and its own prefill and decode deployments
with their replica bounds and autoscaling.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from cluster.autoscaling import SignalPolicy
from engine.config import EngineConfig
from kvtransfer import KVTransferConfig


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class SLO(_Frozen):
    """Targets in seconds: time to first token and inter-token latency (goodput counts requests meeting both)."""

    ttft_s: float = Field(2.0, gt=0)
    itl_s: float = Field(0.2, gt=0)


class Autoscaling(_Frozen):
    """Ray Serve autoscaling_config fields; delays in seconds. How often replicas report load is set by
    the RAY_SERVE_*_AUTOSCALING_METRIC_PUSH_INTERVAL_S environment variables (`pdserve up` sets 1 s)."""

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    initial_replicas: int | None = None
    target_ongoing_requests: float = Field(4.0, gt=0)
    upscale_delay_s: float = Field(2.0, ge=0)
    downscale_delay_s: float = Field(5.0, ge=0)
    look_back_period_s: float = Field(3.0, gt=0)
    # Per-replica targets of load signals that predict latency misses (cluster/autoscaling.py SIGNALS:
    # queued_prompt_tokens, kv_usage, decode_step_s): the deployment scales to the most replicas any
    # signal or target_ongoing_requests asks for. Empty: ongoing requests alone.
    signals: dict[str, float] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _bounds(self) -> Autoscaling:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas {self.min_replicas} > max_replicas {self.max_replicas}")
        SignalPolicy(self.signals)  # unknown names and bad targets fail when the product file loads
        return self


# EngineConfig fields a role may not override: the model, and what shapes the KV blocks both roles exchange.
PRODUCT_WIDE_ENGINE_FIELDS = frozenset({"model", "block_size", "dtype", "max_model_len"})


class Role(_Frozen):
    """One worker role's deployment settings. num_cpus may be fractional (2-core dev machines);
    num_gpus is 1 per engine actor on GPU clusters."""

    autoscaling: Autoscaling = Autoscaling()
    num_cpus: float = Field(0.5, ge=0)
    num_gpus: float = Field(0, ge=0)
    max_ongoing_requests: int = Field(64, ge=1)
    resources: dict[str, float] = {}
    # CPU cores (ids) this role's replicas run on; empty: any. On CPU hosts this is how prefill and
    # decode get separate hardware, as separate GPUs give them on GPU nodes.
    cpu_affinity: tuple[int, ...] = ()
    # EngineConfig fields for this role's engines, over the product's `engine` (e.g. a decode pool sized
    # for decoding: kv_cache_bytes, max_num_seqs). Fields that decide the KV layout or the model stay
    # product-wide: both roles must agree on them for KV blocks to move between them.
    engine: dict[str, Any] = {}

    @field_validator("engine")
    @classmethod
    def _role_engine(cls, v: dict[str, Any]) -> dict[str, Any]:
        shared = sorted(set(v) & PRODUCT_WIDE_ENGINE_FIELDS)
        if shared:
            raise ValueError(f"{', '.join(shared)} must be the same for prefill and decode: set them in the "
                             "product's `engine`, not a role's")
        return v

    @field_validator("cpu_affinity")
    @classmethod
    def _cores(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if any(c < 0 for c in v):
            raise ValueError(f"cpu_affinity takes core ids >= 0, got {list(v)}")
        return v


class ProductConfig(_Frozen):
    name: str
    model: str | None = None  # a name, a .gguf file or a local Hugging Face folder (engine/models.py); None: tiny
    system_prompt: str = ""
    cache_salt: str | None = None  # default: shared by every product with this model and system prompt
    default_max_tokens: int = Field(64, ge=1)
    max_output_tokens: int = Field(512, ge=1)
    slo: SLO = SLO()
    # Answer 429 (Retry-After) at once when a request's predicted time to first token is past this many
    # times slo.ttft_s, instead of accepting a request that will miss; None: never (engine/scheduler.py).
    # A request whose own prompt takes longer than that on an idle engine is served, late: no retry would help.
    reject_past_ttft: float | None = Field(None, gt=0)
    # Answer 429 (Retry-After) at once when, with this request, more requests would decode on its decode engine
    # than this share of its seats: max_num_seqs, or fewer where its ITL targets allow fewer
    # (engine/scheduler.py, check_decode_seats); None: never.
    # Seats a share under 1 leaves free go to other products' requests: a long-answer product given a smaller
    # share is refused first under overload, and the seats it frees serve many short answers instead.
    decode_seat_share: float | None = Field(None, gt=0, le=1)
    api_keys: tuple[str, ...] = ()  # Bearer keys; empty: no auth. Values "env:NAME" read NAME (comma-separated)
    max_queue_len: int = Field(64, ge=1)  # in-flight samples across all ingress replicas before 429 (split)
    disaggregated: bool = True
    # Disaggregated products: a prompt whose uncached part is at most this many tokens may be computed on the
    # decode engine instead, when that is cheaper than the remote path's measured cost (a short follow-up
    # pays no KV transfer; decode_workers/prefill_placement.py). 0: always on a prefill worker.
    local_prefill_max_tokens: int = Field(0, ge=0)
    # Disaggregated products: the prefill worker publishes each prefill chunk's finished KV blocks as it goes
    # (chunks: the prefill engine's max_num_batched_tokens) and the decode worker fetches them while later
    # chunks compute, instead of one export after the whole prompt (decode_workers/streamed_kv.py).
    kv_streaming: bool = False
    engine: dict[str, Any] = {}
    # KVTransferConfig fields. The gRPC transport's shared token comes from the environment variable that
    # auth_token_env names, read by each worker when it starts; a literal auth_token is refused here so
    # the secret never sits in a product file (or in the deployment arguments built from it).
    transfer: dict[str, Any] = {}
    prefill: Role = Role()
    decode: Role = Role()
    # Products naming the same pool share one prefill and one decode deployment (one engine pool, as
    # several products share one GPU pool); each keeps its cache salt (shared only where it is the same).
    pool: str | None = None

    @field_validator("name", "pool")
    @classmethod
    def _name(cls, v: str | None) -> str | None:
        if v is not None and (not v or not all(c.isalnum() or c in "-_." for c in v)):
            raise ValueError(f"product and pool names must be non-empty [A-Za-z0-9-_.], got {v!r}")
        return v

    @field_validator("transfer")
    @classmethod
    def _no_secret_in_file(cls, v: dict[str, Any]) -> dict[str, Any]:
        if "auth_token" in v:
            raise ValueError("transfer.auth_token would put the secret in the config: name an environment "
                             "variable with transfer.auth_token_env instead")
        return v

    @model_validator(mode="after")
    def _check(self) -> ProductConfig:
        if self.default_max_tokens > self.max_output_tokens:
            raise ValueError("default_max_tokens must be <= max_output_tokens")
        for role in (None, self.prefill, self.decode):  # validate engine and transfer fields now, not at deploy
            self.engine_config(role)
        self.transfer_config()
        return self

    @property
    def prefix_caching(self) -> bool:
        """engine.enable_prefix_caching: the engines' block-hash caches and the cluster directory."""
        return self.engine_config().enable_prefix_caching

    @property
    def reject_past_s(self) -> float | None:
        """Seconds of predicted time to first token past which a request is refused at once (None: never)."""
        return None if self.reject_past_ttft is None else self.reject_past_ttft * self.slo.ttft_s

    @property
    def pool_name(self) -> str:
        """The deployments serving this product: its own unless it names a shared pool."""
        return self.pool or self.name

    @property
    def salt(self) -> str:
        """The prefix-cache namespace: cache_salt, else one derived from the model and the system prompt."""
        if self.cache_salt:
            return self.cache_salt
        digest = hashlib.sha256(f"{self.model}\0{self.system_prompt}".encode()).hexdigest()[:16]
        return f"shared-{digest}"

    def tenant_salt(self, api_key: str | None, client_salt: str | None) -> str:
        """The namespace of one request: the product's, narrowed by the client's cache_salt under its API key
        (a digest, never the key), so a tenant cannot pick a salt that lands in another key's namespace."""
        if client_salt is None:
            return self.salt
        key = hashlib.sha256(api_key.encode()).hexdigest()[:16] if api_key else "anonymous"
        return f"{self.salt}/{key}/{client_salt}"

    def engine_config(self, role: Role | None = None) -> EngineConfig:
        """The product's engine settings, with `role`'s own on top (None: the product's alone).

        A role's device "auto" becomes what its actors get: CUDA with num_gpus, else the CPU, so a process
        without the GPU (the ingress, the driver) derives the same dtype and KV layout as the engine.
        """
        fields = {"model": self.model, **self.engine, **(role.engine if role else {})}
        if role is not None and fields.get("device", "auto") == "auto":
            fields["device"] = "cuda" if role.num_gpus else "cpu"
        return EngineConfig(**fields)

    def transfer_config(self) -> KVTransferConfig:
        return KVTransferConfig(**self.transfer)

    def resolved_api_keys(self) -> frozenset[str]:
        """The Bearer keys; empty (no auth) only when api_keys is. Raises ValueError when api_keys names
        only variables that are unset or empty, so an ingress missing its Secret fails to start rather
        than serve the product open."""
        keys: set[str] = set()
        for key in self.api_keys:
            if key.startswith("env:"):
                keys.update(k.strip() for k in os.environ.get(key[4:], "").split(",") if k.strip())
            else:
                keys.add(key)
        if self.api_keys and not keys:
            raise ValueError(f"product {self.name!r}: api_keys {list(self.api_keys)} resolve to no key "
                             f"(set the variables they name)")
        return frozenset(keys)


def load_product(path: str | Path) -> ProductConfig:
    data = yaml.safe_load(Path(path).read_text())
    return ProductConfig(**data)


def load_products(directory: str | Path) -> dict[str, ProductConfig]:
    """Every *.yaml in directory, keyed by product name (names must be unique)."""
    products: dict[str, ProductConfig] = {}
    for path in sorted(Path(directory).glob("*.yaml")):
        product = load_product(path)
        if product.name in products:
            raise ValueError(f"product {product.name!r} defined twice (in {path})")
        products[product.name] = product
    if not products:
        raise ValueError(f"no product configs (*.yaml) in {directory}")
    pools(products)
    return products


# What the engines of a pool are made from: products sharing a pool must agree on all of it.
POOL_FIELDS = ("model", "engine", "transfer", "disaggregated", "kv_streaming", "prefill", "decode")


def pools(products: dict[str, ProductConfig]) -> dict[str, list[ProductConfig]]:
    """Products grouped by pool_name, in order. Raises ValueError when a pool's products disagree on
    POOL_FIELDS or a pool name is also another product's own deployment name."""
    grouped: dict[str, list[ProductConfig]] = {}
    for product in products.values():
        grouped.setdefault(product.pool_name, []).append(product)
    for pool, members in grouped.items():
        if pool in products and products[pool].pool_name != pool:
            raise ValueError(f"pool {pool!r} has the name of product {pool!r}, which is in another pool")
        first = members[0]
        for other in members[1:]:
            differ = [f for f in POOL_FIELDS if getattr(other, f) != getattr(first, f)]
            if differ:
                raise ValueError(f"products {first.name!r} and {other.name!r} share pool {pool!r} but differ in "
                                 f"{', '.join(differ)}: a pool has one engine configuration")
    return grouped

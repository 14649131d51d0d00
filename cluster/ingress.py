"""The OpenAI-compatible HTTP ingress: a FastAPI app served by Ray Serve, wiring the request path together.

Per request, in this order, each step its own module:
- the HTTP edge (cluster/http_edge.py): a key no product knows is refused from the headers; the body is
  read within its size and time limits and parsed;
- request preparation (cluster/request_preparation.py): the product from `model`, its key, chat template
  and system prompt, tokens (off the event loop), limits, sampling parameters;
- admission (cluster/admission.py): this replica's share of the product's in-flight bound (429 with
  Retry-After past it); the shares follow the ingress replica count (cluster/admission_split.py);
- the samples run on the product's DecodeServer deployment (cluster/worker_streams.py);
- response assembly (cluster/response_assembly.py): SSE or one JSON body, with the latency metrics.
Every refusal happens before any engine work, in OpenAI's error shape: 400 malformed JSON / too long, 408
body too slow, 413 body too large, 422 wrong types, 401 bad key, 404 unknown model, 429 queue full (with
Retry-After), 503 no healthy replica.

What stays here is the Serve deployment: routes, per-replica state, system-prompt warm-up, health, the
cluster's /metrics and this replica's token-stream server.
"""

# Serve's ingress decorator serializes the class when it is defined, by value: every module-level
# name its methods use must exist by then (helpers above it), and annotations must be real objects
# for FastAPI (so no `from __future__ import annotations`).
import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable

import ray
from fastapi import FastAPI, Request
from fastapi.responses import Response
from ray import serve

from cluster import openai_protocol as oai
from cluster.admission import Release
from cluster.admission_split import AdmissionSplit
from cluster.http_edge import (
    BODY_READ_TIMEOUT_S,
    APIError,
    RequestModel,
    bearer,
    body_limit_bytes,
    check_key,
    install_error_handlers,
    json_body,
    keys_of_all,
    parse_request,
    refusal_reason,
)
from cluster.ingress_membership import serve_membership
from cluster.metric_names import ROLE_INGRESS
from cluster.metrics_exposition import CONTENT_TYPE, scrape
from cluster.metrics_hub import get_or_create_hub
from cluster.metrics_reporter import MetricsReporter
from cluster.prefix_directory import get_or_create_directory
from cluster.products import ProductConfig
from cluster.request_preparation import PreparedRequest, RequestPreparer
from cluster.response_assembly import respond
from cluster.served_product import ServedProduct, load_product
from cluster.worker_streams import open_stream, open_streams_of
from decode_workers.token_stream import TokenStreamSecurity
from decode_workers.token_stream_server import TokenStreamServer

log = logging.getLogger(__name__)

# How decode workers send a request's outputs here. "direct": over the ingress's token stream server, one
# frame per engine step for all of a worker's streams (decode_workers/token_stream.py); "serve": each
# output its own item of a Serve streaming call.
TOKEN_STREAM_MODES = ("direct", "serve")
# The longest wait for the metrics hub, in seconds.
METRICS_TIMEOUT_S = 10.0

app = FastAPI(title="pdserve", description="OpenAI-compatible API of a disaggregated LLM cluster")
install_error_handlers(app)


@serve.ingress(app)
class OpenAIIngress:
    def __init__(self, products: dict[str, dict], decoders: dict, prefills: dict | None = None,
                 token_stream: str = "direct", body_timeout_s: float = BODY_READ_TIMEOUT_S,
                 token_stream_host: str | None = None, token_stream_security: dict | None = None) -> None:
        """token_stream_host: the address the token-stream server binds and decode workers dial; None: this
        node's address (decode replicas may run on other nodes). A one-node cluster uses loopback.
        token_stream_security: TokenStreamSecurity fields; beyond loopback, direct streams need TLS or
        allow_plaintext, and without either the tokens take the "serve" path."""
        if token_stream not in TOKEN_STREAM_MODES:
            raise ValueError(f"token_stream must be one of {TOKEN_STREAM_MODES}, not {token_stream!r}")
        configs = {name: ProductConfig(**cfg) for name, cfg in products.items()}
        if any(c.disaggregated and c.prefix_caching for c in configs.values()):
            get_or_create_directory()  # prefill workers find it by name; it outlives any one of them
        self._token_stream_mode = token_stream
        self._token_stream_host = token_stream_host
        self._token_stream_security = TokenStreamSecurity(**(token_stream_security or {}))
        self._token_server: TokenStreamServer | None = None
        self._token_server_lock = asyncio.Lock()
        self._decoders = decoders
        self._prefills = prefills or {}
        self._products = {name: load_product(config) for name, config in configs.items()}
        # Each product's bound split across the ingress replicas; split once now, before any request, and
        # then every second off the request path (started with the metrics reporter).
        self._split = AdmissionSplit([p.admission for p in self._products.values()], serve_membership)
        self._split.refresh_now()
        self._preparer = RequestPreparer(self._products)
        self._body_limit = body_limit_bytes(max(p.max_model_len for p in self._products.values()))
        self._body_timeout_s = body_timeout_s
        self._any_key = keys_of_all(p.keys for p in self._products.values())
        self._created = int(time.time())
        self._warmed: asyncio.Task | None = None
        self._hub = get_or_create_hub()
        self._reporter = MetricsReporter(f"ingress-{uuid.uuid4().hex[:8]}", ROLE_INGRESS, "*",
                                         lambda: {n: p.snapshot(open_streams_of(self._token_server, n))
                                                  for n, p in self._products.items()})

    # ---- routes -----------------------------------------------------------------------------------
    @app.get("/v1/models")
    async def models(self) -> dict:
        return oai.models_list(list(self._products), self._created)

    @app.get("/health")
    async def health(self) -> dict:
        """"token_stream": how outputs reach this replica, "direct" or "serve" (decided at the first request:
        direct streams fall back to serve where they would be plaintext across hosts)."""
        return {"status": "ok", "token_stream": self._token_stream_mode}

    @app.get("/metrics")
    async def metrics(self) -> Response:
        """Prometheus text for the whole cluster: every replica of every deployment, by product."""
        text = await scrape(self._reporter.flush, self._hub.render.remote, METRICS_TIMEOUT_S)
        return Response(text, media_type=CONTENT_TYPE)

    @app.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        return await self._counted(request, self._completions)

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        return await self._counted(request, self._chat_completions)

    async def _counted(self, request: Request, handler: Callable[[Request], Awaitable[Response]]) -> Response:
        """Run a route; count a refusal against its product (when the body named a known one)."""
        self._start_background()
        await check_key(request, self._any_key)  # before reading the body
        try:
            return await handler(request)
        except APIError as exc:
            product = self._products.get(getattr(request.state, "model", None))
            if product is not None:
                product.stats.rejected[refusal_reason(exc)] += 1
            raise

    async def _completions(self, request: Request) -> Response:
        req = await self._parsed(request, oai.CompletionRequest)
        product = self._product(req.model, request)
        return await self._serve(await self._preparer.completion(product, req, bearer(request)))

    async def _chat_completions(self, request: Request) -> Response:
        req = await self._parsed(request, oai.ChatCompletionRequest)
        product = self._product(req.model, request)
        return await self._serve(await self._preparer.chat(product, req, bearer(request)))

    async def _parsed(self, request: Request, model: type[RequestModel]) -> RequestModel:
        """The body as model, read within this replica's limits; notes the product it names for _counted."""
        req = parse_request(model, await json_body(request, self._body_limit, self._body_timeout_s))
        request.state.model = req.model
        return req

    # ---- Serve hooks ------------------------------------------------------------------------------
    async def check_health(self) -> None:
        self._start_background()
        self._ensure_warm()

    async def admission_limits(self) -> dict[str, int]:
        """This replica's share of each product's bound now (operators and tests read it)."""
        return {name: p.admission.limit for name, p in self._products.items()}

    async def warm(self) -> dict[str, int]:
        """Compute each system prompt once and pin it in the prefix directory: once per namespace, so products
        sharing a model and a system prompt (one salt) leave it to the first of them."""
        results = {}
        done: set[tuple[str, tuple[int, ...]]] = set()
        for name, product in self._products.items():
            prefill = self._prefills.get(name)
            key = (product.config.salt, tuple(product.system_prefix))
            if prefill is None or not product.system_prefix or not product.config.prefix_caching or key in done:
                continue
            done.add(key)
            results[name] = await prefill.warm_prefix.remote(product.system_prefix, product.config.salt)
        return results

    # ---- internals --------------------------------------------------------------------------------
    def _start_background(self) -> None:
        """The metrics pushes and the admission re-split, on the replica's event loop (idempotent)."""
        self._reporter.start()
        self._split.start()

    def _ensure_warm(self) -> None:
        if self._warmed is None:
            self._warmed = asyncio.ensure_future(self.warm())
            self._warmed.add_done_callback(self._log_warm_failure)

    @staticmethod
    def _log_warm_failure(task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.warning("warming system prompts failed: %r", task.exception())

    def _product(self, model: str, request: Request) -> ServedProduct:
        """The product the request names and its key opens; its first use warms the system prompts."""
        product = self._preparer.product(model, bearer(request))
        self._ensure_warm()
        return product

    async def _serve(self, job: PreparedRequest) -> Response:
        """Admit job's n samples, start them (seeds seed, seed+1, ...: reproducible) and answer."""
        server = await self._token_streams()
        admission = job.product.admission
        admission.admit(job.n)
        name = job.product.config.name
        streams = [open_stream(self._decoders[name], job.sample_request(i), name, server, job.product.stats)
                   for i in range(job.n)]
        return await respond(job, streams, Release(admission, streams))

    async def _token_streams(self) -> TokenStreamServer | None:
        """This replica's token stream server, started on first use on the replica's event loop (None in
        "serve" mode). It listens on token_stream_host, by default the node's address: decode replicas may
        run on other nodes."""
        if self._token_stream_mode != "direct":
            return None
        async with self._token_server_lock:
            if self._token_server is None:
                host = self._token_stream_host or ray.util.get_node_ip_address()
                if not self._token_stream_security.permits(host):
                    log.warning("token streams on %s would be plaintext across hosts (no TLS configured, "
                                "plaintext not allowed): tokens go through Serve's calls instead", host)
                    self._token_stream_mode = "serve"
                    return None
                server = TokenStreamServer(self._token_stream_security)
                try:
                    await server.start(host)
                except OSError as exc:
                    raise APIError(503, f"cannot open the token stream port: {exc!r}", "server_error",
                                   "unavailable") from exc
                self._token_server = server
        return self._token_server

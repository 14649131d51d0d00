"""The OpenAI-compatible HTTP ingress: a FastAPI app served by Ray Serve.

Per request: parse and validate (pydantic), pick the product from `model`,
check its API key, apply its chat template with its system prompt, tokenize,
check limits, then stream from the product's DecodeServer deployment and turn
StepOutputs into OpenAI JSON or server-sent events. Every refusal happens
before any engine work and in OpenAI's error shape:
400 malformed JSON / too long, 408 body too slow, 413 body too large, 422 wrong
types, 401 bad key, 404 unknown model, 429 queue full (with Retry-After), 503 no
healthy replica. A request is refused before its body is read where the headers
suffice: every product asks for an API key and the request's is none of them.
Tokenizing and chat templates run on one thread of the ingress's own, off its event loop.
"""

# Serve's ingress decorator serializes the class when it is defined, by value: every module-level
# name its methods use must exist by then (helpers above it), and annotations must be real objects
# for FastAPI (so no `from __future__ import annotations`).
import asyncio
import json
import logging
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

import ray
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from ray import serve
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from starlette.requests import ClientDisconnect
from transformers import AutoTokenizer

from cluster import openai_protocol as oai
from cluster.detokenizer import IncrementalDetokenizer
from cluster.direct_stream import DirectStream
from cluster.logprobs import LogprobFormatter
from cluster.metrics import (
    CONTENT_TYPE,
    E2E_REQUEST_LATENCY,
    INGRESS_INFLIGHT,
    INTER_TOKEN_LATENCY,
    REQUEST_SUCCESS,
    REQUESTS_REJECTED,
    ROLE_INGRESS,
    TIME_TO_FIRST_TOKEN,
    TOKEN_STREAMS_OPEN,
    Histogram,
    MetricsReporter,
    MetricsSnapshot,
    get_or_create_hub,
)
from cluster.prefix_directory import get_or_create_directory
from cluster.products import ProductConfig
from decode_workers.token_stream import TokenStreamError, TokenStreamSecurity, TokenStreamServer
from engine.async_engine import RequestFailedError
from engine.config import SamplingParams, error_message
from engine.engine import context_limit
from engine.model import load_config
from engine.models import resolve as resolve_model

log = logging.getLogger(__name__)

# How decode workers send a request's outputs here. "direct": over the ingress's token stream server, one
# frame per engine step for all of a worker's streams (decode_workers/token_stream.py); "serve": each
# output its own item of a Serve streaming call.
TOKEN_STREAM_MODES = ("direct", "serve")

# The body limit follows the longest context served: BODY_BYTES_PER_TOKEN bytes of JSON per token is far above
# any real prompt (a token is a few characters; six bytes each even as \uXXXX escapes), so no prompt that fits
# is refused, while a huge body is refused before it is buffered whole, parsed and tokenized. The context
# limit itself is checked after tokenizing. MIN_BODY_BYTES leaves room for JSON around short contexts.
BODY_BYTES_PER_TOKEN = 64
MIN_BODY_BYTES = 1 << 20
# A refused body up to this many times the limit is read to its end and dropped before the 413 goes out.
# Answering while the client is still sending makes the server close a socket with unread data, which sends a
# TCP reset, and the reset can reach the client before it has read the 413: it then sees "connection reset"
# instead of the answer. Bodies declared larger still get the 413 at once (reading them would be the attack).
DRAIN_REFUSED_FACTOR = 4
# A whole body must arrive within this many seconds: a client uploading slower (by accident or to hold
# connections open) is answered 408 and holds an ingress slot no longer.
BODY_READ_TIMEOUT_S = 30.0
# A request refused from its headers alone has its body read and dropped up to this many bytes, for at most
# UNREAD_DRAIN_S seconds, before the answer: a small body (any real client's) then gets a clean 401 instead
# of a reset (see DRAIN_REFUSED_FACTOR); a larger or slower one is not worth waiting for.
UNREAD_DRAIN_BYTES = 64 << 10
UNREAD_DRAIN_S = 2.0
# Waits on a worker, in seconds: for a sample's first output (queueing and prefill included), for each next
# output, and for the metrics hub. A worker that stops sending without failing (wedged; its health check
# then gets it replaced) ends the request with a 503 or an SSE error instead of holding it forever.
FIRST_OUTPUT_TIMEOUT_S = 300.0
NEXT_OUTPUT_TIMEOUT_S = 300.0
METRICS_TIMEOUT_S = 10.0


def body_limit_bytes(max_model_len: int) -> int:
    """The largest request body accepted, in bytes, for a longest context of max_model_len tokens."""
    return max(MIN_BODY_BYTES, BODY_BYTES_PER_TOKEN * max_model_len)

app = FastAPI(title="pdserve", description="OpenAI-compatible API of a disaggregated LLM cluster")


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        return JSONResponse(oai.error_body(self.message, self.type, self.code, self.param), status_code=self.status,
                            headers=self.headers)


@app.exception_handler(APIError)
async def _api_error(_: Request, exc: APIError) -> JSONResponse:
    return exc.response()


@app.exception_handler(RequestValidationError)
async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0] if exc.errors() else {}
    param = ".".join(str(p) for p in first.get("loc", [])[1:]) or None
    return JSONResponse(oai.error_body(f"invalid request: {first.get('msg', 'validation failed')}",
                                       "invalid_request_error", "invalid_value", param), status_code=422)


@dataclass
class _Product:
    config: ProductConfig
    tokenizer: object
    max_model_len: int
    keys: frozenset[str]
    system_prefix: list[int]  # token ids of the rendered system turn: shared by all chat requests
    inflight: int = 0
    ttft: Histogram = field(default_factory=lambda: Histogram.for_metric(TIME_TO_FIRST_TOKEN))
    itl: Histogram = field(default_factory=lambda: Histogram.for_metric(INTER_TOKEN_LATENCY))
    e2e: Histogram = field(default_factory=lambda: Histogram.for_metric(E2E_REQUEST_LATENCY))
    finished: Counter = field(default_factory=Counter)  # finish reason -> requests
    rejected: Counter = field(default_factory=Counter)  # reason -> requests refused before any work

    def snapshot(self, token_streams_open: int) -> MetricsSnapshot:
        return MetricsSnapshot(
            histograms={TIME_TO_FIRST_TOKEN: self.ttft.snapshot(), INTER_TOKEN_LATENCY: self.itl.snapshot(),
                        E2E_REQUEST_LATENCY: self.e2e.snapshot()},
            labelled_counters={REQUEST_SUCCESS: dict(self.finished), REQUESTS_REJECTED: dict(self.rejected)},
            gauges={INGRESS_INFLIGHT: float(self.inflight), TOKEN_STREAMS_OPEN: float(token_streams_open)})


@dataclass
class _Prepared:
    product: _Product
    prompt_token_ids: list[int]
    params: SamplingParams
    cache_salt: str
    n: int
    stream: bool
    include_usage: bool
    chat: bool
    arrival: float = field(default_factory=time.monotonic)

    def observe_first(self) -> float:
        now = time.monotonic()
        self.product.ttft.observe(now - self.arrival)
        return now

    def observe_tokens(self, last: float, num_tokens: int) -> float:
        """Inter-token latency: a step's gap, once per token it brought (seconds)."""
        now = time.monotonic()
        for _ in range(num_tokens):
            self.product.itl.observe((now - last) / num_tokens)
        return now

    def observe_end(self, finish_reasons: list[str]) -> None:
        self.product.e2e.observe(time.monotonic() - self.arrival)
        self.product.finished.update(finish_reasons)


def _with_seed(params: SamplingParams, seed: int) -> SamplingParams:
    return replace(params, seed=seed)


async def _read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    """The raw body; 413 once it passes limit bytes (declared or actual), keeping no byte past the limit;
    408 when it has not all arrived within timeout_s seconds.

    A refused body is still read to its end (and dropped) up to DRAIN_REFUSED_FACTOR times the limit, see there.
    """
    too_large = APIError(413, f"request body over {limit} bytes", code="body_too_large")
    if _declared_length(request) > DRAIN_REFUSED_FACTOR * limit:
        raise too_large
    try:
        chunks, size = await _consume_body(request, limit, DRAIN_REFUSED_FACTOR * limit, timeout_s)
    except ClientDisconnect as exc:  # nobody will read the answer, but it is the client's doing, not a 500
        raise APIError(400, "the client disconnected before sending the whole body", code="incomplete_body") from exc
    except TimeoutError as exc:
        raise APIError(408, f"the request body did not arrive within {timeout_s:g} s", code="body_timeout") from exc
    if size > limit:
        raise too_large
    return b"".join(chunks)


async def _drop_body(request: Request) -> None:
    """Read and drop a refused request's body, within UNREAD_DRAIN_BYTES and UNREAD_DRAIN_S (see there)."""
    if _declared_length(request) > UNREAD_DRAIN_BYTES:
        return
    try:
        await _consume_body(request, 0, UNREAD_DRAIN_BYTES, UNREAD_DRAIN_S)
    except (TimeoutError, ClientDisconnect):
        pass


def _declared_length(request: Request) -> int:
    """The body's Content-Length in bytes; 0 when it declares none (chunked) or an unreadable one."""
    declared = request.headers.get("content-length", "")
    return int(declared) if declared.isdigit() else 0


async def _consume_body(request: Request, keep: int, stop_after: int, timeout_s: float) -> tuple[list[bytes], int]:
    """Read the body until its end or until more than stop_after bytes came, within timeout_s seconds
    (TimeoutError past it; ClientDisconnect if the client goes). Returns the chunks that fit in the first
    keep bytes and the bytes read in all."""
    chunks, size = [], 0
    async with asyncio.timeout(timeout_s):
        async for chunk in request.stream():
            size += len(chunk)
            if size <= keep:
                chunks.append(chunk)
            elif size > stop_after:
                break
    return chunks, size


def _bearer(request: Request) -> str:
    """The request's bearer token ("" without one)."""
    auth = request.headers.get("authorization", "")
    return auth[7:].strip() if auth.lower().startswith("bearer ") else ""


async def _json_body(request: Request, limit: int, timeout_s: float) -> dict:
    raw = await _read_body(request, limit, timeout_s)
    try:
        body = json.loads(raw)
        # \ud800-style escapes decode to lone surrogates, which are not text: the tokenizer would raise
        # TypeError (a 500) on them. Re-encoding finds them; it costs one pass over an accepted body.
        json.dumps(body, ensure_ascii=False).encode()
    # ValueError: bad JSON, bad UTF-8, and integers over Python's digit limit; RecursionError: nesting too deep
    except (ValueError, RecursionError) as exc:
        raise APIError(400, f"malformed JSON body: {type(exc).__name__}: {str(exc)[:200]}",
                       code="invalid_json") from exc
    if not isinstance(body, dict):
        raise APIError(400, "the JSON body must be an object", code="invalid_json")
    return body


def _parse(model: type, body: dict):
    field = oai.unimplemented_field(body)
    if field is not None:
        raise APIError(400, f"`{field}` is not supported by pdserve (only its default value is accepted)",
                       code="unsupported_parameter", param=field)
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first.get("loc", ())) or None
        raise APIError(422, f"invalid request: {param}: {first.get('msg')}", code="invalid_value",
                       param=param) from exc


async def _next(stream: AsyncIterator[dict], timeout_s: float) -> dict:
    """The stream's next output; TokenStreamError when none comes within timeout_s (the wait is cancelled,
    which cancels a DirectStream's call and so aborts the request on its worker)."""
    try:
        async with asyncio.timeout(timeout_s):  # no task per output, as wait_for would make: this is per token
            return await stream.__anext__()
    except TimeoutError as exc:
        raise TokenStreamError(f"no output from the worker within {timeout_s:g} s") from exc


async def _rest(stream: AsyncIterator[dict]) -> AsyncIterator[dict]:
    """The stream's outputs after the first, each within NEXT_OUTPUT_TIMEOUT_S of the one before."""
    while True:
        try:
            out = await _next(stream, NEXT_OUTPUT_TIMEOUT_S)
        except StopAsyncIteration:
            return
        yield out


async def _first(stream: AsyncIterator[dict]) -> dict:
    try:
        return await _next(stream, FIRST_OUTPUT_TIMEOUT_S)
    except StopAsyncIteration as exc:
        raise APIError(503, "the worker ended the request without output", "server_error") from exc
    except (RayTaskError, ValueError, TokenStreamError) as exc:  # TokenStreamError: outputs never arrived here
        cause = getattr(exc, "cause", None) or exc
        if isinstance(cause, ValueError):
            raise APIError(400, str(cause)) from exc
        raise _worker_failure(exc, "") from exc
    except (RayActorError, DeploymentUnavailableError) as exc:
        raise APIError(503, f"no healthy replica: {_describe(exc)}", "server_error", "unavailable") from exc
    except BackPressureError as exc:
        raise APIError(429, "workers are at capacity; retry shortly", "rate_limit_error", "queue_full",
                       headers={"Retry-After": "1"}) from exc


class _TokenClock:
    """Times one stream's token arrivals for the inter-token latency histogram."""

    def __init__(self, job: "_Prepared", first_at: float, first_tokens: int) -> None:
        self.job, self.last = job, first_at
        # A stream that fell behind gets its waiting tokens merged, the first message included: the tokens
        # that came with the first one arrived with it (gaps of ~0), so every token but the first is observed.
        self.tick(first_tokens - 1)

    def tick(self, num_tokens: int) -> None:
        if num_tokens > 0:
            self.last = self.job.observe_tokens(self.last, num_tokens)


async def _drain(stream: AsyncIterator[dict], first: dict, clock: _TokenClock) -> dict:
    """A sample's outputs merged into one: the last output, with every token id (and logprob, when asked)
    since the first in new_token_ids (new_logprobs)."""
    outs = [first]
    if not first["finished"]:
        try:
            async for out in _rest(stream):
                clock.tick(len(out["new_token_ids"]))
                outs.append(out)
        except Exception as exc:
            raise _worker_failure(exc, " mid-request") from exc
    last = outs[-1]
    logprobs = None if first["new_logprobs"] is None else [lp for o in outs for lp in o["new_logprobs"] or []]
    return {**last, "num_output_tokens": max(first["num_output_tokens"], last["num_output_tokens"]),
            "new_token_ids": [t for o in outs for t in o["new_token_ids"]], "new_logprobs": logprobs}


def _worker_failure(exc: BaseException, where: str) -> APIError:
    """500 when the request's own work failed on a healthy engine (it would fail again anywhere); 503 when a
    worker failed (dead, unreachable: another replica may serve a retry)."""
    if isinstance(getattr(exc, "cause", None) or exc, RequestFailedError):
        return APIError(500, f"the request failed{where}: {_describe(exc)}", "server_error", "request_failed")
    return APIError(503, f"worker failed{where}: {_describe(exc)}", "server_error", "worker_failed")


async def _pump(index: int, stream: AsyncIterator[dict], first: dict, queue: asyncio.Queue,
                clock: _TokenClock) -> None:
    await queue.put((index, first))
    if first["finished"]:
        return
    try:
        async for out in _rest(stream):
            clock.tick(len(out["new_token_ids"]))
            await queue.put((index, out))
    except asyncio.CancelledError:
        await _close(stream)
        raise
    except Exception as exc:
        await queue.put((index, exc))


async def _close(stream) -> None:
    cancel = getattr(stream, "cancel", None)
    if cancel is not None:
        cancel()


class _Release:
    """Ends a streamed response's hold on its product exactly once: the in-flight count goes down and, unless
    every sample finished, its streams are closed (which aborts their requests on the workers and drops their
    token-stream queues). Called from the body's end and from the response's end: a client that disconnects
    before the body is first iterated leaves a body generator that never runs, and nothing else would."""

    def __init__(self, product: _Product, streams: list) -> None:
        self._product, self._streams, self._done = product, streams, False

    async def __call__(self, finished: bool) -> None:
        if self._done:
            return
        self._done = True
        self._product.inflight -= len(self._streams)
        if not finished:
            await asyncio.gather(*(_close(s) for s in self._streams), return_exceptions=True)


class _ReleasingStreamingResponse(StreamingResponse):
    """An SSE response whose release runs when the ASGI call ends, however it ends (a body never iterated,
    a send to a gone client, a cancellation)."""

    def __init__(self, content: AsyncIterator[str], release: _Release) -> None:
        super().__init__(content, media_type="text/event-stream")
        self._release = release

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._release(finished=False)  # a no-op when the body ended and released first


def _reject_reason(exc: APIError) -> str:
    if exc.status == 400 and exc.code == "context_length_exceeded":
        return "too_long"
    return {401: "unauthorized", 429: "queue_full", 503: "unavailable"}.get(exc.status, "bad_request")


def _sse_line(obj: dict) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]


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
        self._products = {name: self._load(config) for name, config in configs.items()}
        self._body_limit = body_limit_bytes(max(p.max_model_len for p in self._products.values()))
        self._body_timeout_s = body_timeout_s
        # Keys that can open any product, when every product asks for one (None: some product is open).
        keyed = all(p.keys for p in self._products.values())
        self._any_key = frozenset().union(*(p.keys for p in self._products.values())) if keyed else None
        # One thread: HF tokenizers are not safe to share between threads; one is enough to free the loop.
        self._tokenize_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pdserve-tokenize")
        self._created = int(time.time())
        self._warmed: asyncio.Task | None = None
        self._hub = get_or_create_hub()
        self._reporter = MetricsReporter(f"ingress-{uuid.uuid4().hex[:8]}", ROLE_INGRESS, "*",
                                         lambda: {n: p.snapshot(self._open_streams(n))
                                                  for n, p in self._products.items()})

    @staticmethod
    def _load(config: ProductConfig) -> _Product:
        engine_config = config.engine_config()
        path = resolve_model(engine_config.model)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        prefix: list[int] = []
        if config.system_prompt:
            prefix = tokenizer.apply_chat_template([{"role": "system", "content": config.system_prompt}],
                                                   tokenize=True, return_dict=False)
        hf_config = load_config(path)
        # A request must fit every engine it passes through (a role may size its KV pool differently).
        roles = (config.prefill, config.decode) if config.disaggregated else (config.decode,)
        limit = min(context_limit(config.engine_config(role), hf_config) for role in roles)
        return _Product(config, tokenizer, limit, config.resolved_api_keys(), prefix)

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
        try:
            async with asyncio.timeout(METRICS_TIMEOUT_S):
                await self._reporter.flush()
                text = await self._hub.render.remote()
        except TimeoutError as exc:
            raise APIError(503, f"the metrics hub did not answer within {METRICS_TIMEOUT_S:g} s", "server_error",
                           "unavailable") from exc
        return Response(text, media_type=CONTENT_TYPE)

    @app.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        return await self._counted(request, self._completions)

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        return await self._counted(request, self._chat_completions)

    async def _counted(self, request: Request, handler) -> Response:
        """Run a route; count a refusal against its product (when the body named a known one)."""
        self._reporter.start()
        if self._any_key is not None and _bearer(request) not in self._any_key:  # before parsing the body
            await _drop_body(request)
            raise APIError(401, "Incorrect or missing API key.", "authentication_error", "invalid_api_key")
        try:
            return await handler(request)
        except APIError as exc:
            product = self._products.get(getattr(request.state, "model", None))
            if product is not None:
                product.rejected[_reject_reason(exc)] += 1
            raise

    async def _completions(self, request: Request) -> Response:
        body = await _json_body(request, self._body_limit, self._body_timeout_s)
        req = _parse(oai.CompletionRequest, body)
        request.state.model = req.model
        product = self._product(req.model, request)
        ids = req.prompt if isinstance(req.prompt, list) else await self._off_loop(
            product.tokenizer.encode, req.prompt, add_special_tokens=False)
        key = getattr(request.state, "api_key", None)
        return await self._serve(self._prepare(product, req, ids, req.max_tokens, chat=False, api_key=key))

    async def _chat_completions(self, request: Request) -> Response:
        body = await _json_body(request, self._body_limit, self._body_timeout_s)
        req = _parse(oai.ChatCompletionRequest, body)
        request.state.model = req.model
        product = self._product(req.model, request)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in req.messages]
        if product.config.system_prompt:
            messages = [{"role": "system", "content": product.config.system_prompt}, *messages]
        try:
            ids = await self._off_loop(product.tokenizer.apply_chat_template, messages, tokenize=True,
                                       add_generation_prompt=True, return_dict=False)
        except Exception as exc:  # a template that refuses these messages (jinja's raise_exception): the client's
            raise APIError(400, f"the model's chat template refused these messages: {_describe(exc)}",
                           param="messages") from exc
        key = getattr(request.state, "api_key", None)
        return await self._serve(self._prepare(product, req, ids, req.requested_max_tokens, chat=True, api_key=key))

    # ---- Serve hooks ------------------------------------------------------------------------------
    async def check_health(self) -> None:
        self._reporter.start()
        self._ensure_warm()

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
    def _ensure_warm(self) -> None:
        if self._warmed is None:
            self._warmed = asyncio.ensure_future(self.warm())
            self._warmed.add_done_callback(self._log_warm_failure)

    @staticmethod
    def _log_warm_failure(task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.warning("warming system prompts failed: %r", task.exception())

    def _product(self, model: str, request: Request) -> _Product:
        product = self._products.get(model)
        if product is None:
            raise APIError(404, f"The model `{model}` does not exist. Available: {sorted(self._products)}",
                           "invalid_request_error", "model_not_found", "model")
        if product.keys:
            token = _bearer(request)
            if token not in product.keys:
                raise APIError(401, "Incorrect or missing API key for this model.", "authentication_error",
                               "invalid_api_key")
            request.state.api_key = token
        self._ensure_warm()
        return product

    async def _off_loop(self, fn, *args, **kwargs):
        """fn(*args, **kwargs) on the tokenizing thread: a long prompt's tokens or a chat template take
        milliseconds to tens of them, which on the event loop would stall every stream this replica serves."""
        return await asyncio.get_running_loop().run_in_executor(self._tokenize_pool, lambda: fn(*args, **kwargs))

    def _prepare(self, product: _Product, req: oai._SamplingFields, ids: list[int], max_tokens: int | None,
                 chat: bool, api_key: str | None = None) -> _Prepared:
        config = product.config
        max_tokens = max_tokens if max_tokens is not None else config.default_max_tokens
        if max_tokens > config.max_output_tokens:
            raise APIError(400, f"max_tokens is {max_tokens}, over this model's limit of "
                                f"{config.max_output_tokens} output tokens", param="max_tokens")
        if not ids:
            raise APIError(400, "The prompt is empty.", param="prompt")
        if len(ids) + max_tokens > product.max_model_len:
            raise APIError(400, f"This model's maximum context length is {product.max_model_len} tokens. However, "
                                f"you requested {len(ids) + max_tokens} tokens ({len(ids)} in the prompt, "
                                f"{max_tokens} for the completion).", code="context_length_exceeded",
                           param="messages" if chat else "prompt")
        vocab = len(product.tokenizer)
        if any(t >= vocab for t in ids):
            raise APIError(400, f"prompt token ids must be below the vocabulary size {vocab}", param="prompt")
        try:
            params = SamplingParams(
                n=1, temperature=1.0 if req.temperature is None else req.temperature,
                top_p=1.0 if req.top_p is None else req.top_p, top_k=req.top_k or 0, seed=req.seed,
                max_tokens=max_tokens, stop=req.stop, ignore_eos=req.ignore_eos, logprobs=req.num_logprobs)
        except ValueError as exc:
            raise APIError(400, error_message(exc)) from exc
        salt = config.tenant_salt(api_key, req.cache_salt)
        return _Prepared(product, list(ids), params, salt, req.n, req.stream, req.include_usage, chat)

    async def _serve(self, job: _Prepared) -> Response:
        # n samples: n sequences with seeds seed, seed+1, ... (reproducible), merged by index
        product = job.product
        server = await self._token_streams()
        if product.inflight + job.n > product.config.max_queue_len:
            raise APIError(429, f"Too many requests in flight for `{product.config.name}`; retry shortly.",
                           "rate_limit_error", "queue_full", headers={"Retry-After": "1"})
        product.inflight += job.n
        streams = [self._start(job, i, server) for i in range(job.n)]
        release = _Release(product, streams)
        try:
            firsts = await asyncio.gather(*(_first(s) for s in streams))
        except BaseException:  # a failed sample, or the client gone (cancelled): end the others too
            await release(finished=False)
            raise
        first_at = job.observe_first()
        clocks = [_TokenClock(job, first_at, len(first["new_token_ids"])) for first in firsts]
        if job.stream:
            return _ReleasingStreamingResponse(self._sse(job, streams, firsts, clocks, release), release)
        finished = False
        try:
            body = await self._collect(job, streams, firsts, clocks)
            finished = True
            return JSONResponse(body)
        finally:
            await release(finished)

    def _open_streams(self, product: str) -> int:
        server = self._token_server
        return 0 if server is None else server.num_open_for(f"{product}/")

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

    def _start(self, job: _Prepared, index: int, server: TokenStreamServer | None) -> AsyncIterator[dict]:
        params = job.params if job.params.seed is None else _with_seed(job.params, job.params.seed + index)
        request = {"prompt_token_ids": job.prompt_token_ids, "sampling_params": params, "cache_salt": job.cache_salt}
        handle = self._decoders[job.product.config.name]
        if server is None:
            return handle.options(stream=True).generate.remote(request).__aiter__()
        stream_id = f"{job.product.config.name}/{uuid.uuid4().hex}"  # per product: counted by _open_streams
        request["token_stream"] = server.target(stream_id).as_dict()
        return DirectStream(server, stream_id, handle.generate_to.remote(request))

    async def _collect(self, job: _Prepared, streams: list, firsts: list[dict], clocks: list[_TokenClock]) -> dict:
        outs = await asyncio.gather(*(_drain(s, f, c) for s, f, c in zip(streams, firsts, clocks, strict=True)))
        job.observe_end([o["finish_reason"] for o in outs])
        choices = [(o["text"] or "", o["finish_reason"], self._logprobs(job, o)) for o in outs]
        completion = sum(o["num_output_tokens"] for o in outs)
        u = oai.usage(len(job.prompt_token_ids), completion, firsts[0]["num_cached_tokens"])
        rid = oai.new_id("chatcmpl" if job.chat else "cmpl")
        name = job.product.config.name
        return oai.chat_response(rid, name, choices, u) if job.chat else oai.completion_response(rid, name, choices, u)

    @staticmethod
    def _logprobs(job: _Prepared, out: dict, formatter: LogprobFormatter | None = None) -> dict | None:
        """The OpenAI logprobs of out's tokens (None when the request asked for none)."""
        if job.params.logprobs is None or out["new_logprobs"] is None:
            return None
        formatter = formatter or LogprobFormatter(job.product.tokenizer, job.params.logprobs)
        shape = formatter.chat if job.chat else formatter.completion
        return shape(out["new_token_ids"], out["new_logprobs"])

    async def _sse(self, job: _Prepared, streams: list, firsts: list[dict], clocks: list[_TokenClock],
                   release: _Release) -> AsyncIterator[str]:
        name = job.product.config.name
        rid, created = oai.new_id("chatcmpl" if job.chat else "cmpl"), int(time.time())
        queue: asyncio.Queue = asyncio.Queue()
        pumps = [asyncio.ensure_future(_pump(i, s, f, queue, c))
                 for i, (s, f, c) in enumerate(zip(streams, firsts, clocks, strict=True))]
        reasons: list[str] = []
        detoks = [IncrementalDetokenizer(job.product.tokenizer, job.params.stop) for _ in streams]
        formatters = [LogprobFormatter(job.product.tokenizer, job.params.logprobs or 0) for _ in streams]
        completion_tokens, live = 0, len(streams)
        finished = False
        try:
            if job.chat:
                for i in range(len(streams)):
                    yield _sse_line(oai.chat_chunk(rid, name, created, i, {"role": "assistant", "content": ""}, None))
            while live:
                index, out = await queue.get()
                if isinstance(out, BaseException):
                    error = _worker_failure(out, " mid-request")
                    yield _sse_line(oai.error_body(error.message, error.type, error.code))
                    break
                text = detoks[index].add(out["new_token_ids"])
                if out["finished"]:
                    text += detoks[index].finish(out["text"] or "")
                    completion_tokens += out["num_output_tokens"]
                    reasons.append(out["finish_reason"])
                    live -= 1
                reason = out["finish_reason"] if out["finished"] else None
                logprobs = self._logprobs(job, out, formatters[index]) if out["new_token_ids"] else None
                if text or reason or logprobs:
                    chunk = (oai.chat_chunk(rid, name, created, index, {"content": text} if text else {}, reason,
                                            logprobs)
                             if job.chat else oai.completion_chunk(rid, name, created, index, text, reason, logprobs))
                    yield _sse_line(chunk)
            else:
                finished = True
                job.observe_end(reasons)
                if job.include_usage:
                    u = oai.usage(len(job.prompt_token_ids), completion_tokens, firsts[0]["num_cached_tokens"])
                    yield _sse_line(oai.usage_chunk(rid, name, created,
                                                    "chat.completion.chunk" if job.chat else "text_completion", u))
            yield "data: [DONE]\n\n"
        finally:
            for pump in pumps:
                pump.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            await release(finished)

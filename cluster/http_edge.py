"""The ingress's HTTP edge: what a request must pass before any product work, and how refusals look.

Every refusal is an APIError, answered in OpenAI's error shape: 400 malformed JSON or an unsupported
parameter, 408 body too slow, 413 body too large, 422 wrong types, 401 a key no product knows (from the
headers alone, before the body is read). A body is read within a size and a time limit, keeping no byte
past the size limit, so a huge or slow upload costs the ingress neither memory nor a slot for long.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable
from typing import TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect

from cluster import openai_protocol as oai

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

RequestModel = TypeVar("RequestModel", bound=BaseModel)


class APIError(Exception):
    """A refusal or failure answered to the client: HTTP status, OpenAI error type, code and param."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        return JSONResponse(oai.error_body(self.message, self.type, self.code, self.param), status_code=self.status,
                            headers=self.headers)


def install_error_handlers(app: FastAPI) -> None:
    """Answer APIError and FastAPI's own validation errors (422) in OpenAI's error shape."""
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)


async def _api_error(_: Request, exc: APIError) -> JSONResponse:
    return exc.response()


async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0] if exc.errors() else {}
    param = ".".join(str(p) for p in first.get("loc", [])[1:]) or None
    return JSONResponse(oai.error_body(f"invalid request: {first.get('msg', 'validation failed')}",
                                       "invalid_request_error", "invalid_value", param), status_code=422)


def describe(exc: BaseException) -> str:
    """An exception in one line of at most 300 characters, for an error message."""
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]


def refusal_reason(exc: APIError) -> str:
    """The label a refused request is counted under (REQUESTS_REJECTED)."""
    if exc.status == 400 and exc.code == "context_length_exceeded":
        return "too_long"
    return {401: "unauthorized", 429: "queue_full", 503: "unavailable"}.get(exc.status, "bad_request")


# ---- API keys ------------------------------------------------------------------------------------

def bearer(request: Request) -> str:
    """The request's bearer token ("" without one)."""
    auth = request.headers.get("authorization", "")
    return auth[7:].strip() if auth.lower().startswith("bearer ") else ""


def keys_of_all(key_sets: Iterable[frozenset[str]]) -> frozenset[str] | None:
    """The keys that open some product, when every product asks for one; None when some product is open
    (then no request can be refused from its headers alone)."""
    key_sets = list(key_sets)
    return frozenset().union(*key_sets) if all(key_sets) else None


async def check_key(request: Request, known: frozenset[str] | None) -> None:
    """401 when every product asks for a key and the request's is none of them (known: keys_of_all's),
    after dropping its body (see UNREAD_DRAIN_BYTES)."""
    if known is not None and bearer(request) not in known:
        await drop_body(request)
        raise APIError(401, "Incorrect or missing API key.", "authentication_error", "invalid_api_key")


# ---- the body ------------------------------------------------------------------------------------

def body_limit_bytes(max_model_len: int) -> int:
    """The largest request body accepted, in bytes, for a longest context of max_model_len tokens."""
    return max(MIN_BODY_BYTES, BODY_BYTES_PER_TOKEN * max_model_len)


async def read_body(request: Request, limit: int, timeout_s: float) -> bytes:
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


async def drop_body(request: Request) -> None:
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


async def json_body(request: Request, limit: int, timeout_s: float) -> dict:
    """The body as a JSON object, read within read_body's limits; 400 when it is not one."""
    raw = await read_body(request, limit, timeout_s)
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


def parse_request(model: type[RequestModel], body: dict) -> RequestModel:
    """body as the request model: 400 for a field pdserve does not implement, 422 for a wrong type or value."""
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

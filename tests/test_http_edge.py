"""The HTTP edge on its own, over hand-made ASGI requests (no Ray, no server): body limits in size and
time, the header-only key check, JSON and model parsing, and errors in OpenAI's shape."""

from __future__ import annotations

import asyncio
import json

import pytest
from fastapi import FastAPI
from starlette.requests import Request

from cluster import openai_protocol as oai
from cluster.http_edge import (
    DRAIN_REFUSED_FACTOR,
    MIN_BODY_BYTES,
    UNREAD_DRAIN_BYTES,
    APIError,
    bearer,
    body_limit_bytes,
    check_key,
    install_error_handlers,
    json_body,
    keys_of_all,
    parse_request,
    read_body,
    refusal_reason,
)

LIMIT = 1000


class Client:
    """The receiving side of one ASGI request: its body in chunks, then optionally a stall or a departure."""

    def __init__(self, chunks: list[bytes], then: str = "end", endless: bytes | None = None) -> None:
        self.chunks, self.then, self.endless, self.received = list(chunks), then, endless, 0

    async def receive(self) -> dict:
        if self.endless is not None:
            self.received += 1
            return {"type": "http.request", "body": self.endless, "more_body": True}
        if self.chunks:
            self.received += 1
            chunk = self.chunks.pop(0)
            return {"type": "http.request", "body": chunk, "more_body": bool(self.chunks) or self.then != "end"}
        if self.then == "stall":
            await asyncio.Event().wait()
        return {"type": "http.disconnect"}


def _request(client: Client, headers: dict[str, str] | None = None) -> Request:
    raw = [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    return Request({"type": "http", "method": "POST", "path": "/", "headers": raw}, client.receive)


def _refusal(coro) -> APIError:
    with pytest.raises(APIError) as info:
        asyncio.run(coro)
    return info.value


# ---- body size and time ------------------------------------------------------------------------

def test_a_body_within_the_limit_is_read_whole() -> None:
    client = Client([b"a" * 600, b"b" * 400])
    assert asyncio.run(read_body(_request(client), LIMIT, 5.0)) == b"a" * 600 + b"b" * 400


def test_a_body_declared_far_over_the_limit_is_refused_unread() -> None:
    client = Client([b"x" * 10])
    error = _refusal(read_body(_request(client, {"content-length": str(DRAIN_REFUSED_FACTOR * LIMIT + 1)}),
                               LIMIT, 5.0))
    assert (error.status, error.code) == (413, "body_too_large")
    assert client.received == 0


def test_a_body_over_the_limit_is_read_to_its_end_then_refused() -> None:
    """Within DRAIN_REFUSED_FACTOR times the limit, the client gets to send it all (no reset before the 413)."""
    client = Client([b"x" * 500] * 4)
    error = _refusal(read_body(_request(client), LIMIT, 5.0))
    assert error.status == 413 and client.received == 4 and not client.chunks


def test_an_endless_chunked_body_stops_being_read_past_the_drain_bound() -> None:
    client = Client([], endless=b"x" * 100)
    error = _refusal(read_body(_request(client), LIMIT, 5.0))
    assert error.status == 413
    assert client.received == DRAIN_REFUSED_FACTOR * LIMIT // 100 + 1  # the first chunk past the bound ends it


def test_a_body_too_slow_is_a_408() -> None:
    error = _refusal(read_body(_request(Client([b"{"], then="stall")), LIMIT, 0.2))
    assert (error.status, error.code) == (408, "body_timeout") and "0.2 s" in error.message


def test_a_client_gone_mid_body_is_a_400() -> None:
    error = _refusal(read_body(_request(Client([b"{"], then="disconnect")), LIMIT, 5.0))
    assert (error.status, error.code) == (400, "incomplete_body")


def test_the_body_limit_follows_the_longest_context() -> None:
    assert body_limit_bytes(16) == MIN_BODY_BYTES
    assert body_limit_bytes(1 << 20) == 64 << 20


# ---- API keys from the headers -----------------------------------------------------------------

@pytest.mark.parametrize("header, token", [
    ("Bearer sk-1", "sk-1"), ("bearer   sk-2 ", "sk-2"), ("Basic c2stMQ==", ""), ("", ""),
])
def test_bearer(header: str, token: str) -> None:
    assert bearer(_request(Client([]), {"authorization": header} if header else {})) == token


def test_keys_of_all_only_when_every_product_asks_for_one() -> None:
    assert keys_of_all([frozenset({"a"}), frozenset({"b", "c"})]) == {"a", "b", "c"}
    assert keys_of_all([frozenset({"a"}), frozenset()]) is None


def test_an_unknown_key_is_refused_from_the_headers_after_dropping_a_small_body() -> None:
    client = Client([b'{"model": "x"}'])
    error = _refusal(check_key(_request(client, {"authorization": "Bearer wrong"}), frozenset({"sk-1"})))
    assert (error.status, error.type, error.code) == (401, "authentication_error", "invalid_api_key")
    assert client.received == 1 and not client.chunks  # read and dropped: the 401 reaches the client cleanly


def test_a_large_body_refused_from_the_headers_is_not_read() -> None:
    client = Client([b"x" * 10])
    headers = {"content-length": str(UNREAD_DRAIN_BYTES + 1)}
    assert _refusal(check_key(_request(client, headers), frozenset({"sk-1"}))).status == 401
    assert client.received == 0


@pytest.mark.parametrize("known, header", [(None, ""), (frozenset({"sk-1"}), "Bearer sk-1")])
def test_a_known_key_or_an_open_product_leaves_the_body_unread(known: frozenset | None, header: str) -> None:
    client = Client([b"{}"])
    asyncio.run(check_key(_request(client, {"authorization": header}), known))
    assert client.received == 0


# ---- JSON and the request models ---------------------------------------------------------------

@pytest.mark.parametrize("raw, says", [
    (b'{"model": ', "malformed JSON"),
    (b'\xff{}', "malformed JSON"),
    (b'{"model": "\\ud800"}', "malformed JSON"),  # a lone surrogate: not text
    (b"[" * 100_000 + b"]" * 100_000, "malformed JSON"),  # nesting deeper than the parser goes
    (b'{"n": 1' + b"0" * 5000 + b"}", "malformed JSON"),  # an integer past Python's digit limit
    (b"[1, 2]", "must be an object"),
])
def test_a_body_that_is_not_a_json_object_is_a_400(raw: bytes, says: str) -> None:
    error = _refusal(json_body(_request(Client([raw])), 1 << 20, 5.0))
    assert (error.status, error.code) == (400, "invalid_json") and says in error.message


def test_a_json_object_is_returned_as_a_dict() -> None:
    assert asyncio.run(json_body(_request(Client([b'{"a": [1, "\\u00e9"]}'])), LIMIT, 5.0)) == {"a": [1, "é"]}


def test_an_unimplemented_parameter_is_a_400_and_its_inert_value_is_accepted() -> None:
    body = {"model": "m", "prompt": "hi", "frequency_penalty": 0.5}
    with pytest.raises(APIError) as info:
        parse_request(oai.CompletionRequest, body)
    assert (info.value.status, info.value.code, info.value.param) == (400, "unsupported_parameter",
                                                                      "frequency_penalty")
    assert parse_request(oai.CompletionRequest, {**body, "frequency_penalty": 0}).prompt == "hi"


def test_a_wrong_type_is_a_422_naming_the_field() -> None:
    with pytest.raises(APIError) as info:
        parse_request(oai.CompletionRequest, {"model": "m", "prompt": "hi", "max_tokens": "many"})
    assert (info.value.status, info.value.code, info.value.param) == (422, "invalid_value", "max_tokens")


# ---- errors in OpenAI's shape ------------------------------------------------------------------

def _call(app: FastAPI, path: str) -> tuple[int, dict[bytes, bytes], dict]:
    """GET path from app over ASGI: (status, headers, JSON body)."""
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    path, _, query = path.partition("?")
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": query.encode(), "root_path": "",
             "headers": [], "server": ("test", 80), "client": ("test", 1)}
    asyncio.run(app(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], dict(start["headers"]), json.loads(body)


def test_errors_are_answered_in_openais_shape() -> None:
    app = FastAPI()
    install_error_handlers(app)

    @app.get("/full")
    async def full() -> dict:
        raise APIError(429, "retry shortly", "rate_limit_error", "queue_full", headers={"Retry-After": "1"})

    @app.get("/typed")
    async def typed(count: int) -> dict:
        return {"count": count}

    status, headers, body = _call(app, "/full")
    assert status == 429 and headers[b"retry-after"] == b"1"
    assert body == {"error": {"message": "retry shortly", "type": "rate_limit_error", "param": None,
                              "code": "queue_full"}}
    status, _, body = _call(app, "/typed?count=many")
    assert status == 422 and body["error"]["code"] == "invalid_value" and body["error"]["param"] == "count"
    assert _call(app, "/typed?count=3")[2] == {"count": 3}


@pytest.mark.parametrize("error, reason", [
    (APIError(400, "long", code="context_length_exceeded"), "too_long"),
    (APIError(400, "bad"), "bad_request"),
    (APIError(413, "big", code="body_too_large"), "bad_request"),
    (APIError(401, "key"), "unauthorized"),
    (APIError(429, "full"), "queue_full"),
    (APIError(503, "down"), "unavailable"),
])
def test_refusals_are_counted_by_reason(error: APIError, reason: str) -> None:
    assert refusal_reason(error) == reason

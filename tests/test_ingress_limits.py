"""What the ingress refuses before doing work: from the headers alone, a body too slow, a body too large.

An app of its own ("keyed", under /keyed) has one product, which asks for an API key, so every request
without a known key can be refused from its headers, before its body is read or parsed. Its bodies must
arrive within 3 s. The body limit follows the longest context the app serves.
"""

from __future__ import annotations

import json
import socket
import time
from urllib.parse import urlsplit

import openai
import pytest
from ray import serve

from cluster.app import build_app
from cluster.http_edge import MIN_BODY_BYTES, UNREAD_DRAIN_BYTES, body_limit_bytes
from tests.cluster_helpers import tiny_products

APP = "keyed"
KEY = "sk-keyed-test"
BODY_TIMEOUT_S = 3.0
TIMEOUT_S = 120
TINY_CONTEXT = 4096  # the built-in tiny model's max_position_embeddings: the app's longest context


@pytest.fixture(scope="module")
def keyed_url(pdserve_url: str):
    base = tiny_products()["support-chat"]
    keyed = base.model_copy(update={"name": APP, "cache_salt": APP, "api_keys": (KEY,), "disaggregated": False})
    serve.run(build_app({APP: keyed}, body_timeout_s=BODY_TIMEOUT_S, token_stream_host="127.0.0.1"), name=APP,
              route_prefix=f"/{APP}")
    yield f"{pdserve_url}/{APP}"
    serve.delete(APP)


def _exchange(url: str, headers: dict[str, str], body: bytes, then_wait: bool = True) -> tuple[int, dict, float]:
    """POST /v1/chat/completions with these headers and these body bytes (possibly fewer than declared), then
    read the answer: (status, JSON body, seconds from the last byte sent to the answer)."""
    parts = urlsplit(url)
    head = f"POST {parts.path}/v1/chat/completions HTTP/1.1\r\nHost: {parts.hostname}:{parts.port}\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in {"Content-Type": "application/json", **headers}.items()) + "\r\n"
    with socket.create_connection((parts.hostname, parts.port), timeout=TIMEOUT_S) as sock:
        sock.sendall(head.encode() + body)
        sent = time.monotonic()
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = sock.recv(65536)
            assert chunk, f"connection closed before an answer: {answer!r}"
            answer += chunk
        waited = time.monotonic() - sent
        header, rest = answer.split(b"\r\n\r\n", 1)
        length = int(next(line.split(b":")[1] for line in header.split(b"\r\n")
                          if line.lower().startswith(b"content-length")))
        while len(rest) < length:
            rest += sock.recv(65536)
    return int(header.split()[1]), json.loads(rest[:length]), waited


def _chat(content: str = "hi") -> bytes:
    return json.dumps({"model": APP, "messages": [{"role": "user", "content": content}], "max_tokens": 2}).encode()


def test_the_right_key_is_served(keyed_url: str) -> None:
    client = openai.OpenAI(base_url=f"{keyed_url}/v1", api_key=KEY, max_retries=0, timeout=TIMEOUT_S)
    answer = client.chat.completions.create(model=APP, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert answer.usage.completion_tokens == 2


def test_a_request_without_a_known_key_is_refused_before_its_body_arrives(keyed_url: str) -> None:
    """The body is declared (1 MiB) but never sent: only a check on the headers can answer, and it does
    (the body timeout would answer 408, and only after BODY_TIMEOUT_S)."""
    for headers in ({}, {"Authorization": "Bearer sk-wrong"}, {"Authorization": f"Basic {KEY}"}):
        status, body, _ = _exchange(keyed_url, {**headers, "Content-Length": str(1 << 20)}, b"")
        assert status == 401 and body["error"]["code"] == "invalid_api_key", (headers, body)


def test_a_refused_client_reads_its_401_not_a_reset(keyed_url: str) -> None:
    """A wrong key with an ordinary body, through the openai client, many times: each gets the 401 (the body
    is drained before the answer, so the socket is never closed on unread data)."""
    assert UNREAD_DRAIN_BYTES < MIN_BODY_BYTES  # a refusal reads less than any accepted body may hold
    client = openai.OpenAI(base_url=f"{keyed_url}/v1", api_key="sk-wrong", max_retries=0, timeout=TIMEOUT_S)
    for i in range(20):
        with pytest.raises(openai.AuthenticationError):
            client.chat.completions.create(model=APP, messages=[{"role": "user", "content": f"hi {i} " * 2000}],
                                           max_tokens=2)


def test_a_body_that_arrives_too_slowly_gets_408(keyed_url: str) -> None:
    body = _chat()
    headers = {"Authorization": f"Bearer {KEY}", "Content-Length": str(len(body))}
    status, answer, waited = _exchange(keyed_url, headers, body[:10])  # the rest never comes
    assert status == 408 and answer["error"]["code"] == "body_timeout", answer
    assert waited >= BODY_TIMEOUT_S * 0.9  # the limit, not an earlier failure, answered


def test_the_body_limit_follows_the_longest_context(keyed_url: str) -> None:
    assert body_limit_bytes(1024) == MIN_BODY_BYTES  # short contexts: the floor
    assert body_limit_bytes(131072) == 64 * 131072 > body_limit_bytes(8192)  # long ones: per token
    limit = body_limit_bytes(TINY_CONTEXT)
    headers = {"Authorization": f"Bearer {KEY}"}
    over = _chat("x" * limit)
    status, answer, _ = _exchange(keyed_url, {**headers, "Content-Length": str(len(over))}, over)
    assert status == 413 and answer["error"]["code"] == "body_too_large" and str(limit) in answer["error"]["message"]
    under = _chat("word " * ((limit - 200) // 5))  # fits the body limit: refused later, for its tokens
    status, answer, _ = _exchange(keyed_url, {**headers, "Content-Length": str(len(under))}, under)
    assert status == 400 and answer["error"]["code"] == "context_length_exceeded", answer

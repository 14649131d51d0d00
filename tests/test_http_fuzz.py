"""Property-based fuzzing of the HTTP API: bad requests get a 4xx in OpenAI's error shape and cost no engine work.

Hypothesis drives it directly rather than schemathesis: the ingress's routes read the
raw body themselves (to answer malformed JSON and wrong types in OpenAI's error shape),
so the OpenAPI schema FastAPI publishes has no request bodies to generate from.
Strategies instead start from a valid request and break it one way each: wrong
types, missing fields, huge or negative numbers, empty messages, over-long lists,
unknown fields on top, bad raw bytes (non-UTF-8, truncated or deeply nested JSON,
lone surrogates, huge bodies), and bad API keys. Every strategy is built to produce
only requests the server must refuse, so "no state change" is exact: the engines'
counters in /metrics are equal before and after each batch.

Runs are derandomized (the same examples every run) and bounded (< 90 s here).
"""

from __future__ import annotations

import http.client
import json
import time
import urllib.parse
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cluster.http_edge import DRAIN_REFUSED_FACTOR, body_limit_bytes
from tests.test_http_api import REPORT_KEY, _assert_error, _metrics, _post, _settled_metrics

FUZZ = settings(max_examples=120, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

CHAT = {"model": "support-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
COMPLETION = {"model": "support-chat", "prompt": "hi", "max_tokens": 2}
SUPPORT_MAX_OUTPUT = 256  # deploy/products/support-chat.yaml max_output_tokens
VOCAB = 8192  # the built-in tiny model's
MAX_BODY_BYTES = body_limit_bytes(4096)  # the session app's limit: its longest context is the tiny model's 4,096
DRAIN_REFUSED_BYTES = DRAIN_REFUSED_FACTOR * MAX_BODY_BYTES
ENGINE_COUNTERS = (  # every counter a request that reached a worker would move
    "pdserve:prompt_tokens_computed_total", "pdserve:prompt_tokens_cached_total", "pdserve:generation_tokens_total",
    "pdserve:prefix_cache_queries_total", "pdserve:request_success_total", "pdserve:time_to_first_token_seconds_count",
    "pdserve:e2e_request_latency_seconds_count", "pdserve:kv_transfer_bytes_total",
)

JSON_SCALARS = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8)
JSON_VALUES = st.recursive(JSON_SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
    st.text(max_size=6), inner, max_size=3), max_leaves=8)
WORDS = st.text(alphabet="abcxyz -", min_size=1, max_size=8).filter(lambda s: s.strip("-") != "")  # never numbers
NOT_NUMBER = st.one_of(WORDS, st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=3), st.integers(),
                                                                                   max_size=2))
NOT_INT = st.one_of(NOT_NUMBER, st.floats().filter(lambda f: not f.is_integer()))  # 1.5, inf, nan: not integers
NOT_BOOL = st.one_of(st.sampled_from(["maybe", "2", "tru"]), st.integers().filter(lambda i: i not in (0, 1)),
                     st.lists(st.booleans(), max_size=2), st.floats().filter(lambda f: f not in (0.0, 1.0)))
NOT_STR = st.one_of(st.integers(), st.floats(), st.booleans(), st.lists(st.text(max_size=3), max_size=2),
                    st.dictionaries(st.text(max_size=3), st.text(max_size=3), max_size=2))
HUGE = st.one_of(st.integers(min_value=10**6 + 1), st.sampled_from([10**30, 2**64, 1e308]))
NEGATIVE = st.one_of(st.integers(max_value=-1), st.floats(max_value=-1e-9, allow_nan=False))
BAD_MESSAGE = st.one_of(
    st.fixed_dictionaries({"role": st.text(max_size=10).filter(
        lambda r: r not in ("system", "developer", "user", "assistant")), "content": st.just("hi")}),
    st.fixed_dictionaries({"role": st.just("user"), "content": NOT_STR.filter(lambda v: not isinstance(v, list))}),
    st.fixed_dictionaries({"role": st.just("user")}),
    st.fixed_dictionaries({"role": st.just("user"), "content": st.lists(st.fixed_dictionaries(
        {"type": st.just("image_url"), "text": st.just("x")}), min_size=1, max_size=2)}),
    NOT_STR.filter(lambda v: not isinstance(v, dict)),
)

# field -> strategy of values the server must refuse for it (alone, with everything else valid)
SAMPLING_LIES: dict[str, st.SearchStrategy] = {
    "model": st.one_of(NOT_STR, st.just(""), st.text(min_size=257, max_size=300),
                       st.sampled_from(["no-such-model", "support-chat ", "SUPPORT-CHAT"])),
    "max_tokens": st.one_of(NOT_INT, HUGE, NEGATIVE.filter(lambda v: isinstance(v, int)), st.just(0),
                            st.integers(SUPPORT_MAX_OUTPUT + 1, 10**6)),
    "temperature": st.one_of(NOT_NUMBER, NEGATIVE, st.floats(min_value=2.0001), st.just(float("nan"))),
    "top_p": st.one_of(NOT_NUMBER, NEGATIVE, st.just(0), st.floats(min_value=1.0001)),
    "top_k": st.one_of(NOT_INT, HUGE, st.integers(max_value=-1)),
    "n": st.one_of(NOT_INT, st.integers(max_value=0), st.integers(min_value=9)),
    "seed": st.one_of(NOT_INT, st.integers(max_value=-1), st.integers(min_value=2**63)),
    "stop": st.one_of(st.lists(st.text(min_size=1, max_size=4), min_size=5, max_size=8), st.just([""]),
                      st.just(""), st.text(min_size=257, max_size=300), st.integers(), st.dictionaries(
                          st.text(max_size=3), st.text(max_size=3), min_size=1, max_size=2)),
    "stream": NOT_BOOL,
    "stream_options": st.one_of(NOT_NUMBER.filter(lambda v: not isinstance(v, dict)),
                                st.fixed_dictionaries({"include_usage": NOT_BOOL})),
    "ignore_eos": NOT_BOOL,
    "cache_salt": st.one_of(NOT_STR, st.text(min_size=257, max_size=300)),
}
CHAT_LIES = {
    **SAMPLING_LIES,
    "messages": st.one_of(st.just([]), NOT_STR.filter(lambda v: not isinstance(v, list)), st.lists(
        BAD_MESSAGE, min_size=1, max_size=3), st.just([{"role": "user", "content": "x"}] * 1025)),
    "max_completion_tokens": SAMPLING_LIES["max_tokens"],
}
COMPLETION_LIES = {
    **SAMPLING_LIES,
    "prompt": st.one_of(
        st.just(""), st.just([]), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2), st.none(),
        st.lists(st.integers(max_value=-1), min_size=1, max_size=4),
        st.lists(st.integers(min_value=VOCAB), min_size=1, max_size=4),  # ids outside the vocabulary
        st.lists(st.lists(st.integers(0, 100), max_size=2), min_size=1, max_size=2),
        st.lists(st.integers(0, VOCAB - 1), min_size=5000, max_size=5000),  # over the context length
    ),
    "echo": st.just(True),
}
KNOWN_FIELDS = set(CHAT_LIES) | set(COMPLETION_LIES) | {"logprobs", "top_logprobs"}
UNKNOWN_FIELDS = st.dictionaries(st.text(min_size=1, max_size=12).filter(lambda k: k not in KNOWN_FIELDS),
                                 JSON_VALUES, max_size=3)


@st.composite
def broken(draw: st.DrawFn, valid: dict, lies: dict[str, st.SearchStrategy]) -> dict:
    """`valid` with one field made bad (or a required one dropped), plus maybe unknown fields and stream."""
    body = dict(valid)
    required = [k for k in ("model", "messages", "prompt") if k in valid]
    if draw(st.integers(0, 9)) == 0:
        del body[draw(st.sampled_from(required))]
    else:
        field = draw(st.sampled_from(sorted(lies)))
        body[field] = draw(lies[field])
    if draw(st.booleans()):
        body.setdefault("stream", True)  # refusals come before the stream starts, so also without SSE
    return {**draw(UNKNOWN_FIELDS), **body}


def _json(obj: Any) -> bytes:
    return json.dumps(obj).encode()  # NaN and Infinity as Python's json writes them; the server's json reads them


RAW_BODIES = st.one_of(
    st.binary(max_size=64).map(lambda b: b"\xff" + b),  # never UTF-8
    st.integers(0, len(_json(CHAT)) - 1).map(lambda n: _json(CHAT)[:n]),  # truncated JSON (b"" included)
    JSON_VALUES.filter(lambda v: not isinstance(v, dict)).map(_json),  # JSON, but not an object
    st.integers(1_000, 100_000).map(lambda n: b"[" * n + b"]" * n),  # nesting deeper than the parser's stack
    st.integers(1_000, 100_000).map(lambda n: b'{"a":' * n + b"1" + b"}" * n),
    st.sampled_from(["\\ud800", "a\\udfffb", "\\udbff"]).map(  # lone surrogates: valid JSON, not text
        lambda s: b'{"model": "support-chat", "messages": [{"role": "user", "content": "' + s.encode() + b'"}]}'),
    st.sampled_from(["\\ud800", "x\\udc00"]).map(
        lambda s: b'{"model": "support-chat", "prompt": "' + s.encode() + b'", "max_tokens": 1}'),
)


def _assert_refused(status: int, body: dict) -> None:
    """A 4xx in OpenAI's error shape with a non-empty message."""
    assert 400 <= status < 500, (status, body)
    _assert_error(status, body, status, "")
    assert body["error"]["message"] and body["error"]["type"]


def _engine_counters(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k[0] in ENGINE_COUNTERS}


def _assert_no_engine_work(url: str, batch: Callable[[], None]) -> None:
    """Run batch (requests that must all be refused) and check that no engine counter moved."""
    before = _engine_counters(_settled_metrics(url))
    assert any(k[0] == "pdserve:prompt_tokens_computed_total" for k in before)  # the comparison is not vacuous
    batch()
    time.sleep(2.5)  # one worker push period and then some: a leaked request would show by now
    after = _engine_counters(_metrics(url))
    moved = {k: (before.get(k), v) for k, v in after.items() if before.get(k, 0) != v}
    assert not moved, f"refused requests reached an engine: {moved}"


@pytest.mark.parametrize("route, valid, lies", [("chat/completions", CHAT, CHAT_LIES),
                                                 ("completions", COMPLETION, COMPLETION_LIES)])
def test_broken_requests(pdserve_url: str, route: str, valid: dict, lies: dict[str, st.SearchStrategy]) -> None:
    url = f"{pdserve_url}/v1/{route}"

    @FUZZ
    @given(broken(valid, lies))
    def fuzz(body: dict) -> None:
        _assert_refused(*_post(url, _json(body))[:2])

    _assert_no_engine_work(pdserve_url, fuzz)


def test_malformed_bodies(pdserve_url: str) -> None:
    @settings(FUZZ, max_examples=80)
    @given(raw=RAW_BODIES, path=st.sampled_from(["/v1/chat/completions", "/v1/completions"]))
    def fuzz(raw: bytes, path: str) -> None:
        status, body, _ = _post(f"{pdserve_url}{path}", raw)
        _assert_refused(status, body)
        assert status == 400 and body["error"]["code"] == "invalid_json"

    _assert_no_engine_work(pdserve_url, fuzz)


def test_huge_bodies(pdserve_url: str) -> None:
    url = f"{pdserve_url}/v1/chat/completions"

    def batch() -> None:
        over = _json({**CHAT, "messages": [{"role": "user", "content": "x" * MAX_BODY_BYTES}]})
        status, body, _ = _post(url, over)
        _assert_refused(status, body)
        assert status == 413 and body["error"]["code"] == "body_too_large"
        # Under the byte limit, but far over the context length once tokenized.
        words = "word " * (MAX_BODY_BYTES // 6)
        status, body, _ = _post(url, _json({**CHAT, "messages": [{"role": "user", "content": words}]}))
        _assert_refused(status, body)
        assert body["error"]["code"] == "context_length_exceeded"
        # No declared length (chunked): counted as it arrives, refused the same way.
        status, body = _raw_post(url, {"Transfer-Encoding": "chunked"}, (over[i:i + 65536]
                                                                         for i in range(0, len(over), 65536)))
        assert status == 413 and body["error"]["code"] == "body_too_large"
        # A declared length past what the server reads of a refused body: refused before any of it is sent.
        status, body = _raw_post(url, {"Content-Length": str(DRAIN_REFUSED_BYTES + 1)}, None)
        assert status == 413 and body["error"]["code"] == "body_too_large"

    _assert_no_engine_work(pdserve_url, batch)


def _raw_post(url: str, headers: dict[str, str], chunks: Any) -> tuple[int, dict]:
    """POST with exactly these framing headers; chunks None sends the headers alone and waits for the answer."""
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=120)
    try:
        conn.putrequest("POST", parts.path)
        conn.putheader("Content-Type", "application/json")
        for name, value in headers.items():
            conn.putheader(name, value)
        conn.endheaders()
        if chunks is not None:
            for chunk in chunks:
                conn.send(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
            conn.send(b"0\r\n\r\n")
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


PRINTABLE = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40)


def test_requests_without_the_right_key_cost_no_engine_work(pdserve_url: str) -> None:
    """report-gen takes only its key: any other Authorization header, on either route, streaming or not,
    gets 401 before any work and is counted as a rejection; the right key then does reach the engine."""
    rejected = ("pdserve:requests_rejected_total", (("product", "report-gen"), ("reason", "unauthorized")))
    before_rejected = _metrics(pdserve_url).get(rejected, 0)
    sent = []

    @settings(FUZZ, max_examples=60)
    @given(auth=st.one_of(st.none(), PRINTABLE.map(lambda s: s.strip()), PRINTABLE.map(lambda s: f"Bearer {s}"),
                          st.sampled_from([f"Basic {REPORT_KEY}", REPORT_KEY, f"Bearer {REPORT_KEY}x",
                                           f"Bearer {REPORT_KEY[:-1]}", "Bearer", "Bearer "])),
           chat=st.booleans(), stream=st.booleans())
    def fuzz(auth: str | None, chat: bool, stream: bool) -> None:
        if auth is not None and auth.lower().startswith("bearer ") and auth[7:].strip() == REPORT_KEY:
            return  # the one right key (any case of "Bearer"): not this test's business
        body = {**(CHAT if chat else COMPLETION), "model": "report-gen", "stream": stream}
        headers = {} if auth is None else {"Authorization": auth}
        status, payload, _ = _post(f"{pdserve_url}/v1/{'chat/completions' if chat else 'completions'}", body, headers)
        _assert_refused(status, payload)
        assert status == 401 and payload["error"]["code"] == "invalid_api_key"
        sent.append(status)

    _assert_no_engine_work(pdserve_url, fuzz)
    assert _metrics(pdserve_url)[rejected] - before_rejected == len(sent) > 0

    # The counters are live: the same request with the key does reach report-gen's engines.
    computed = ("pdserve:prompt_tokens_computed_total", (("product", "report-gen"),))
    before = _metrics(pdserve_url)[computed]
    status, payload, _ = _post(f"{pdserve_url}/v1/completions", {**COMPLETION, "model": "report-gen",
                                                                 "prompt": f"key check {time.time()}"},
                               {"Authorization": f"Bearer {REPORT_KEY}"})
    assert status == 200, payload
    deadline = time.monotonic() + 15
    while _metrics(pdserve_url)[computed] == before and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _metrics(pdserve_url)[computed] > before


@pytest.mark.parametrize("path, body", [("/v1/chat/completions", CHAT), ("/v1/completions", COMPLETION)])
def test_unknown_fields_alone_are_ignored(pdserve_url: str, path: str, body: dict) -> None:
    """OpenAI clients send fields pdserve does not use (`user`, ...): alone they do not make a request bad."""
    status, payload, _ = _post(f"{pdserve_url}{path}", {**body, "user": "u-1", "metadata": {"k": "v"},
                                                         "unknown_field_xyz": [1, 2]})
    assert status == 200, payload


@pytest.mark.parametrize("path, body, field, value", [
    ("/v1/chat/completions", CHAT, "tools", [{"type": "function", "function": {"name": "lookup"}}]),
    ("/v1/chat/completions", CHAT, "response_format", {"type": "json_object"}),
    ("/v1/chat/completions", CHAT, "frequency_penalty", 0.5),
    ("/v1/chat/completions", CHAT, "tool_choice", "auto"),
    ("/v1/chat/completions", CHAT, "logit_bias", {"5": 10}),
    ("/v1/completions", COMPLETION, "best_of", 3),
    ("/v1/completions", COMPLETION, "suffix", "and then"),
    ("/v1/completions", COMPLETION, "presence_penalty", -1.0),
])
def test_fields_pdserve_does_not_implement_are_refused_by_name(pdserve_url: str, path: str, body: dict, field: str,
                                                              value: Any) -> None:
    """Accepting and ignoring them would be a silent lie: the client would not get what it asked for."""
    status, payload, _ = _post(f"{pdserve_url}{path}", {**body, field: value})
    assert status == 400 and payload["error"]["param"] == field, payload
    assert payload["error"]["code"] == "unsupported_parameter" and f"`{field}`" in payload["error"]["message"]


def test_those_fields_at_values_that_ask_for_nothing_are_accepted(pdserve_url: str) -> None:
    inert = {"frequency_penalty": 0, "presence_penalty": 0.0, "logprobs": False, "top_logprobs": None, "tools": [],
             "tool_choice": "none", "response_format": {"type": "text"}, "logit_bias": None}
    status, payload, _ = _post(f"{pdserve_url}/v1/chat/completions", {**CHAT, **inert})
    assert status == 200, payload

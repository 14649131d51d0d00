"""Property-based fuzzing of valid-but-extreme requests: nothing may 5xx, and nothing may be left behind.

tests/test_http_fuzz.py sends only requests the server must refuse. Here Hypothesis builds requests at
the edges of what the API takes, on both routes, streamed and not: subnormal, tiny and huge floats in
every float field, integers at and past their limits, seeds past 64 bits, `n` up to its limit, four
stop strings, `logprobs` / `top_logprobs` up to 20, non-ASCII text everywhere (prompts, stops, cache
salts), prompts as token ids. The server may refuse (4xx) where a value is out of range, and must
answer well-formed otherwise (as many choices as `n`, logprobs for every token when asked, a stream
that ends with `[DONE]` and carries no error). Afterwards both products still answer and the cluster
is idle: no request running or waiting, no KV block or export held, nothing counted in flight and no
token stream open on the ingress.

Runs are derandomized (the same examples every run) and bounded (60 requests, max_tokens <= 6).
"""

from __future__ import annotations

import http.client
import json
import urllib.parse
from typing import Any

import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cluster.invariants import wait_cluster_idle
from cluster.metrics import get_hub
from cluster.openai_protocol import MAX_LOGPROBS, MAX_N, MAX_STOP_SEQUENCES
from tests.test_http_api import REPORT_KEY

EXTREMES = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
VOCAB = 8192  # the built-in tiny model's
KEYS = {"support-chat": "unused", "report-gen": REPORT_KEY}

TEXT = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=24)  # any Unicode but surrogates
FLOAT_EDGES = [0.0, 5e-324, 2.2250738585072014e-308, 1e-38, 1e-6, 1.0, 2.0, 1e308, float("inf")]
UNIT_EDGES = [5e-324, 1e-300, 1e-6, 0.5, 1.0]
INT_EDGES = [0, 1, 20, 2**31 - 1, 2**63 - 1, 2**63, 2**64 + 1, 10**40]


def _sampling(draw: st.DrawFn, chat: bool) -> dict[str, Any]:
    body: dict[str, Any] = {"max_tokens": draw(st.integers(1, 6)), "ignore_eos": draw(st.booleans())}
    if draw(st.booleans()):
        body["temperature"] = draw(st.sampled_from(FLOAT_EDGES) | st.floats(0.0, 2.0))
    if draw(st.booleans()):
        body["top_p"] = draw(st.sampled_from(UNIT_EDGES) | st.floats(5e-324, 1.0))
    if draw(st.booleans()):
        body["top_k"] = draw(st.sampled_from([0, 1, 2, VOCAB - 1, VOCAB, 10**6, 10**6 + 1]))
    if draw(st.booleans()):
        body["seed"] = draw(st.sampled_from(INT_EDGES) | st.integers(0, 2**64))
    body["n"] = draw(st.integers(1, MAX_N))
    if draw(st.booleans()):
        body["stop"] = draw(st.lists(TEXT, min_size=1, max_size=MAX_STOP_SEQUENCES))
    if draw(st.booleans()):
        body["cache_salt"] = draw(TEXT)
    if chat and draw(st.booleans()):
        body["logprobs"] = True
        body["top_logprobs"] = draw(st.integers(0, MAX_LOGPROBS))
    elif not chat and draw(st.booleans()):
        body["logprobs"] = draw(st.integers(0, MAX_LOGPROBS))
    if draw(st.booleans()):
        body["stream"] = True
        body["stream_options"] = {"include_usage": draw(st.booleans())}
    return body


@st.composite
def extreme_requests(draw: st.DrawFn) -> tuple[str, str, dict[str, Any]]:
    """(route, product, body): a request at the edges of what the API takes."""
    product = draw(st.sampled_from(sorted(KEYS)))
    chat = draw(st.booleans())
    body: dict[str, Any] = {"model": product, **_sampling(draw, chat)}
    if chat:
        body["messages"] = [{"role": role, "content": draw(TEXT)}
                            for role in draw(st.lists(st.sampled_from(["user", "assistant", "system", "developer"]),
                                                      min_size=1, max_size=3))]
        return "/v1/chat/completions", product, body
    body["prompt"] = draw(TEXT | st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=64))
    return "/v1/completions", product, body


def _send(url: str, path: str, product: str, body: dict) -> tuple[int, bytes]:
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=120)
    try:
        conn.request("POST", path, body=json.dumps(body).encode(),
                     headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEYS[product]}"})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def _check_answer(body: dict, raw: bytes) -> None:
    """A 200's payload is well-formed: n choices, logprobs for every token when asked; a stream ends with
    [DONE] and carries no error event."""
    n = body["n"]
    wants_logprobs = body.get("logprobs") not in (None, False)
    if not body.get("stream"):
        payload = json.loads(raw)
        assert len(payload["choices"]) == n, payload
        for choice in payload["choices"]:
            assert choice["finish_reason"] in ("stop", "length"), choice
            if wants_logprobs:
                logprobs = choice["logprobs"]
                entries = logprobs["content"] if "messages" in body else logprobs["tokens"]
                assert entries, choice
        return
    events = [line[6:] for line in raw.decode().split("\n") if line.startswith("data: ")]
    assert events and events[-1] == "[DONE]", raw[-500:]
    chunks = [json.loads(e) for e in events[:-1]]
    assert not [c for c in chunks if "error" in c], chunks
    finished = {c["choices"][0]["index"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]}
    assert finished == set(range(n)), chunks


def test_extreme_but_valid_requests_never_5xx_and_leave_nothing_behind(pdserve_url: str) -> None:
    statuses: dict[int, int] = {}

    @EXTREMES
    @given(extreme_requests())
    def fuzz(request: tuple[str, str, dict[str, Any]]) -> None:
        path, product, body = request
        status, raw = _send(pdserve_url, path, product, body)
        statuses[status] = statuses.get(status, 0) + 1
        assert status < 500, (status, body, raw[:500])
        if status == 200:
            _check_answer(body, raw)
        else:
            assert json.loads(raw)["error"]["message"], raw[:500]

    fuzz()
    assert statuses.get(200, 0) >= 20, statuses  # most extremes are in range: they were served, not refused
    problems = wait_cluster_idle(get_hub(), timeout_s=30, products=tuple(KEYS))
    assert not problems, problems
    for product, key in KEYS.items():
        client = openai.OpenAI(base_url=f"{pdserve_url}/v1", api_key=key, max_retries=0, timeout=120)
        answer = client.chat.completions.create(model=product, messages=[{"role": "user", "content": "hi"}],
                                                max_tokens=2, extra_body={"ignore_eos": True})
        assert answer.usage.completion_tokens == 2


@pytest.mark.parametrize("field, value", [("temperature", 1e308), ("top_p", 0.0), ("seed", 2**64 + 1),
                                          ("n", MAX_N + 1), ("top_k", -1)])
def test_past_the_edges_is_a_4xx(pdserve_url: str, field: str, value: Any) -> None:
    status, raw = _send(pdserve_url, "/v1/completions", "support-chat",
                        {"model": "support-chat", "prompt": "hi", "max_tokens": 2, field: value})
    assert 400 <= status < 500, raw

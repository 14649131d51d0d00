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

from typing import Any

import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench.extreme_requests import FLOAT_EDGES, INT_EDGES, ROLES, TOP_K_EDGES, UNIT_EDGES, answer_problem, send
from cluster.invariants import wait_cluster_idle
from cluster.metrics_hub import get_hub
from cluster.openai_protocol import MAX_LOGPROBS, MAX_N, MAX_STOP_SEQUENCES
from tests.test_http_api import REPORT_KEY

EXTREMES = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
VOCAB = 8192  # the built-in tiny model's
KEYS = {"support-chat": "unused", "report-gen": REPORT_KEY}
TEXT = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=24)  # any Unicode but surrogates


def _sampling(draw: st.DrawFn, chat: bool) -> dict[str, Any]:
    body: dict[str, Any] = {"max_tokens": draw(st.integers(1, 6)), "ignore_eos": draw(st.booleans())}
    if draw(st.booleans()):
        body["temperature"] = draw(st.sampled_from(FLOAT_EDGES) | st.floats(0.0, 2.0))
    if draw(st.booleans()):
        body["top_p"] = draw(st.sampled_from(UNIT_EDGES) | st.floats(5e-324, 1.0))
    if draw(st.booleans()):
        body["top_k"] = draw(st.sampled_from(TOP_K_EDGES))
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
                            for role in draw(st.lists(st.sampled_from(ROLES), min_size=1, max_size=3))]
        return "/v1/chat/completions", product, body
    body["prompt"] = draw(TEXT | st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=64))
    return "/v1/completions", product, body


def test_extreme_but_valid_requests_never_5xx_and_leave_nothing_behind(pdserve_url: str) -> None:
    statuses: dict[int, int] = {}

    @EXTREMES
    @given(extreme_requests())
    def fuzz(request: tuple[str, str, dict[str, Any]]) -> None:
        path, product, body = request
        status, raw = send(pdserve_url, path, KEYS[product], body)
        statuses[status] = statuses.get(status, 0) + 1
        problem = answer_problem(body, status, raw)
        assert problem is None, (problem, body)

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
    status, raw = send(pdserve_url, "/v1/completions", KEYS["support-chat"],
                       {"model": "support-chat", "prompt": "hi", "max_tokens": 2, field: value})
    assert 400 <= status < 500, raw

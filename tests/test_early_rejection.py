"""Early rejection over HTTP: a product with reject_past_ttft answers 429 with Retry-After at once when its
engine predicts the request's first token past the limit because of the load ahead of it, colocated and
disaggregated, and keeps nothing of the refused request; a request too long to meet the limit even on an idle
engine is served, since no retry would help it. The load: a long prompt computed in 16-token steps, so for a
while every short prompt has thousands of tokens ahead of it. The same refusal holds for a product whose share
of decode seats (decode_seat_share) is absurdly small, checked where the request decodes: on the decode engine
of a disaggregated pool, before any prefill worker is asked."""

from __future__ import annotations

import itertools
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
from ray import serve

from cluster.app import build_app
from cluster.invariants import wait_cluster_idle
from cluster.metrics_hub import get_hub
from cluster.products import SLO
from tests.cluster_helpers import tiny_products

TIMEOUT_S = 120


# A short prompt alone takes a few steps of the tiny model, far under this; one behind the long prompt below
# waits for ~240 steps, far over it.
TTFT_LIMIT_S = 0.1
LONG_PROMPT = "usage " * 3900  # 3,900 tokens of the tiny model's tokenizer, in 16-token steps
SHORT_PROMPT = "Quarterly usage report:"


@pytest.mark.parametrize("disaggregated, limit", [(True, "ttft"), (False, "ttft"), (True, "seats")],
                         ids=["disaggregated", "colocated", "decode-seats"])
def test_a_request_past_its_limit_gets_429_at_once(pdserve_url: str, disaggregated: bool, limit: str) -> None:
    app = f"reject-{'pd' if disaggregated else 'co'}-{limit}"
    base = tiny_products()["support-chat"]
    update = {"slo": SLO(ttft_s=TTFT_LIMIT_S, itl_s=0.2), "reject_past_ttft": 1.0,
              "engine": {**base.engine, "max_num_batched_tokens": 16}} if limit == "ttft" else \
        {"decode_seat_share": 1e-6}
    product = base.model_copy(update={"name": app, "cache_salt": app, "disaggregated": disaggregated, **update})
    patient = base.model_copy(update={"name": f"{app}-patient", "cache_salt": app, "disaggregated": disaggregated})
    serve.run(build_app({app: product, patient.name: patient}, token_stream_host="127.0.0.1"), name=app,
              route_prefix=f"/{app}")
    try:
        client = openai.OpenAI(base_url=f"{pdserve_url}/{app}/v1", api_key="none", max_retries=0, timeout=TIMEOUT_S)
        refusal = _refusal(client, app) if limit == "ttft" else _refusal_for_seats(client, app)
        body = refusal.response.json()["error"]
        assert body["code"] == "slo_overloaded"
        assert ("time to first token" if limit == "ttft" else "requests would decode") in body["message"]
        assert int(refusal.response.headers["Retry-After"]) >= 1
        # a product without the limit, on engines of the same shape, still answers
        answer = client.completions.create(model=patient.name, prompt=SHORT_PROMPT, max_tokens=4)
        assert answer.usage.completion_tokens == 4
        problems = wait_cluster_idle(get_hub(), timeout_s=30, products=(app, patient.name))
        assert not problems, problems
    finally:
        serve.delete(app)


def _refusal(client: openai.OpenAI, app: str) -> openai.RateLimitError:
    """The first refusal of a short prompt sent while a long one is computed. Each long prompt (a new one each
    round: none is in the prefix cache) takes longer than the limit on its own and is never refused."""
    deadline = time.monotonic() + TIMEOUT_S
    client.completions.create(model=app, prompt=SHORT_PROMPT, max_tokens=4)  # the engine learns a token's cost
    with ThreadPoolExecutor(1) as pool:
        for round_ in itertools.count():
            long = pool.submit(client.completions.create, model=app, prompt=f"{round_} {LONG_PROMPT}", max_tokens=1)
            refusal = None
            while refusal is None and not long.done():
                assert time.monotonic() < deadline, "no request was refused"
                try:
                    client.completions.create(model=app, prompt=SHORT_PROMPT, max_tokens=4)
                except openai.RateLimitError as exc:
                    refusal = exc
            assert long.result().usage.completion_tokens == 1
            if refusal is not None:
                return refusal
    raise AssertionError("unreachable")


def _refusal_for_seats(client: openai.OpenAI, app: str) -> openai.RateLimitError:
    """The first refusal of a request past its share of decode seats (the first request teaches the engine
    a decode step's cost)."""
    deadline = time.monotonic() + TIMEOUT_S
    while True:
        assert time.monotonic() < deadline, "no request was refused"
        try:
            client.completions.create(model=app, prompt=SHORT_PROMPT, max_tokens=4)
        except openai.RateLimitError as exc:
            return exc

"""Early rejection over HTTP: a product with reject_past_ttft answers 429 with Retry-After at once when its
engine predicts the request's first token past the limit, colocated and disaggregated, and keeps nothing of
the refused request. The product's TTFT target is absurdly small (1 us), so once an engine has timed one
prompt every later prediction is past it: the test needs no load, only a second request. The same holds for
a product whose share of decode seats (decode_seat_share) is absurdly small, checked where the request
decodes: on the decode engine of a disaggregated pool, before any prefill worker is asked."""

from __future__ import annotations

import time

import openai
import pytest
from ray import serve

from cluster.app import build_app
from cluster.invariants import wait_cluster_idle
from cluster.metrics_hub import get_hub
from cluster.products import SLO
from tests.cluster_helpers import tiny_products

TIMEOUT_S = 120


@pytest.mark.parametrize("disaggregated, limit", [(True, "ttft"), (False, "ttft"), (True, "seats")],
                         ids=["disaggregated", "colocated", "decode-seats"])
def test_a_request_past_its_limit_gets_429_at_once(pdserve_url: str, disaggregated: bool, limit: str) -> None:
    app = f"reject-{'pd' if disaggregated else 'co'}-{limit}"
    base = tiny_products()["support-chat"]
    update = {"slo": SLO(ttft_s=1e-6, itl_s=0.2), "reject_past_ttft": 1.0} if limit == "ttft" else \
        {"decode_seat_share": 1e-6}
    product = base.model_copy(update={"name": app, "cache_salt": app, "disaggregated": disaggregated, **update})
    patient = base.model_copy(update={"name": f"{app}-patient", "cache_salt": app, "disaggregated": disaggregated})
    serve.run(build_app({app: product, patient.name: patient}, token_stream_host="127.0.0.1"), name=app,
              route_prefix=f"/{app}")
    try:
        client = openai.OpenAI(base_url=f"{pdserve_url}/{app}/v1", api_key="none", max_retries=0, timeout=TIMEOUT_S)
        refusal = None
        deadline = time.monotonic() + TIMEOUT_S
        while refusal is None:  # the first request teaches the engine what a prompt token costs
            assert time.monotonic() < deadline, "no request was refused"
            try:
                client.completions.create(model=app, prompt="Quarterly usage report:", max_tokens=4)
            except openai.RateLimitError as exc:
                refusal = exc
        body = refusal.response.json()["error"]
        assert body["code"] == "slo_overloaded"
        assert ("time to first token" if limit == "ttft" else "requests would decode") in body["message"]
        assert int(refusal.response.headers["Retry-After"]) >= 1
        # a product without the limit, on engines of the same shape, still answers
        answer = client.completions.create(model=patient.name, prompt="Quarterly usage report:", max_tokens=4)
        assert answer.usage.completion_tokens == 4
        problems = wait_cluster_idle(get_hub(), timeout_s=30, products=(app, patient.name))
        assert not problems, problems
    finally:
        serve.delete(app)

"""Products sharing one engine pool: one prefill and one decode deployment serve them all."""

from __future__ import annotations

import openai
import pytest
from ray import serve

from cluster.app import build_app
from cluster.products import pools
from tests.cluster_helpers import tiny_products

APP = "pooled"


def _pooled() -> dict:
    products = tiny_products()
    chat = products["support-chat"]
    # report-gen takes support-chat's engine settings: a pool has one engine configuration
    shared = {f: getattr(chat, f) for f in ("model", "engine", "transfer", "disaggregated", "prefill", "decode")}
    return {name: p.model_copy(update={**shared, "pool": "shared"}) for name, p in products.items()}


def test_products_of_a_pool_are_grouped() -> None:
    grouped = pools(_pooled())
    assert list(grouped) == ["shared"] and sorted(p.name for p in grouped["shared"]) == ["report-gen", "support-chat"]
    own = pools(tiny_products())
    assert sorted(own) == ["report-gen", "support-chat"]  # no pool: each product is its own


def test_a_pool_has_one_engine_configuration() -> None:
    products = _pooled()
    report = products["report-gen"]
    products["report-gen"] = report.model_copy(update={"engine": {**report.engine, "max_num_seqs": 3}})
    with pytest.raises(ValueError, match="differ in engine"):
        pools(products)


def test_a_pool_cannot_take_the_name_of_a_product_in_another_pool() -> None:
    products = tiny_products()
    products["report-gen"] = products["report-gen"].model_copy(update={"pool": "support-chat"})
    products["support-chat"] = products["support-chat"].model_copy(update={"pool": "elsewhere"})
    with pytest.raises(ValueError, match="has the name of product"):
        pools(products)


def test_both_products_are_served_by_the_pool_over_http(pdserve_url: str) -> None:
    handle = serve.run(build_app(_pooled(), token_stream_host="127.0.0.1"), name=APP, route_prefix=f"/{APP}")
    try:
        handle.warm.remote().result(timeout_s=300)
        deployments = set(serve.status().applications[APP].deployments)
        assert deployments == {"ingress", "shared-prefill", "shared-decode"}
        client = openai.OpenAI(base_url=f"{pdserve_url}/{APP}/v1", api_key="none", max_retries=0, timeout=120)
        for model in ("support-chat", "report-gen"):
            out = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hello"}],
                                                 max_tokens=5, temperature=0.0)
            assert out.model == model and out.usage.completion_tokens == 5
            # the system prompt was pinned once for both (one model, one prompt: one namespace) and reused
            assert out.usage.prompt_tokens_details.cached_tokens > 0
    finally:
        serve.delete(APP)

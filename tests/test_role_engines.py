"""A role's own engine settings over its product's: prefill and decode engines sized for their work."""

from __future__ import annotations

import pydantic
import pytest

from cluster.app import build_app
from cluster.products import ProductConfig, Role
from cluster.served_product import load_product
from tests.cluster_helpers import tiny_products

BLOCK_BYTES = 2 * 2 * 16 * 2 * 16 * 4  # tiny model: layers * K/V * block tokens * kv heads * head dim * fp32


def _product(prefill_engine: dict, decode_engine: dict, disaggregated: bool = True) -> ProductConfig:
    base = tiny_products()["support-chat"].model_dump()
    return ProductConfig(**{**base, "disaggregated": disaggregated,  # validated as a product file would be
                            "prefill": {**base["prefill"], "engine": prefill_engine},
                            "decode": {**base["decode"], "engine": decode_engine}})


def test_a_roles_engine_settings_go_over_the_products() -> None:
    product = _product({"kv_cache_bytes": 8 << 20}, {"kv_cache_bytes": 24 << 20, "max_num_seqs": 5})
    assert product.engine_config(product.prefill).kv_cache_bytes == 8 << 20
    decode = product.engine_config(product.decode)
    assert decode.kv_cache_bytes == 24 << 20 and decode.max_num_seqs == 5
    assert decode.block_size == product.engine_config().block_size == product.engine["block_size"]
    assert product.engine_config().kv_cache_bytes == product.engine["kv_cache_bytes"]  # the product's own


@pytest.mark.parametrize("field", ["block_size", "dtype", "model", "max_model_len"])
def test_a_role_cannot_change_what_both_roles_must_share(field: str) -> None:
    value = {"block_size": 32, "dtype": "bfloat16", "model": "/elsewhere", "max_model_len": 64}[field]
    with pytest.raises(pydantic.ValidationError, match=f"{field} must be the same for prefill and decode"):
        Role(engine={field: value})


def test_a_roles_bad_engine_field_is_refused_when_the_product_loads() -> None:
    with pytest.raises(pydantic.ValidationError, match="max_num_seqs"):
        _product({}, {"max_num_seqs": 0})


def test_each_deployment_is_built_with_its_roles_engine() -> None:
    product = _product({"kv_cache_bytes": 8 << 20}, {"kv_cache_bytes": 24 << 20})
    ingress = build_app({product.name: product})._bound_deployment
    decoders, prefills = ingress.init_args[1], ingress.init_args[2]
    assert decoders[product.name]._bound_deployment.init_args[0]["kv_cache_bytes"] == 24 << 20
    assert prefills[product.name]._bound_deployment.init_args[0]["kv_cache_bytes"] == 8 << 20


@pytest.mark.parametrize("disaggregated", [True, False])
def test_the_ingress_limits_requests_to_the_smallest_engine_they_pass(disaggregated: bool) -> None:
    product = _product({"kv_cache_bytes": 10 * BLOCK_BYTES}, {"kv_cache_bytes": 30 * BLOCK_BYTES}, disaggregated)
    # Disaggregated: the prefill engine's 10 blocks bound the request; colocated, only the decode engine runs it.
    assert load_product(product).max_model_len == (10 if disaggregated else 30) * 16

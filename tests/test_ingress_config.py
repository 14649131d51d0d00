"""The ingress deployment as the app builds it: Serve autoscaling from the app's `ingress` settings, and
products whose bound could not be split across its replicas refused when the app is built."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from cluster.app import app_builder, build_app
from cluster.ingress_config import IngressConfig
from cluster.products import Autoscaling
from tests.cluster_helpers import tiny_products


def _ingress_config(app) -> object:
    return app._bound_deployment._deployment_config


def test_the_ingress_is_one_autoscaled_replica_by_default() -> None:
    config = _ingress_config(build_app(tiny_products()))
    scaling = config.autoscaling_config
    assert (scaling.min_replicas, scaling.max_replicas, scaling.target_ongoing_requests) == (1, 1, 64)
    assert config.max_ongoing_requests == 1024


def test_the_app_args_ingress_block_sets_its_autoscaling(tmp_path: Path) -> None:
    folder = tmp_path / "products"
    folder.mkdir()
    for name, product in tiny_products().items():
        (folder / f"{name}.yaml").write_text(yaml.safe_dump(product.model_dump(mode="json")))
    app = app_builder({"products_dir": str(folder), "ingress": {"num_cpus": 0.2, "autoscaling": {
        "min_replicas": 2, "max_replicas": 5, "target_ongoing_requests": 16, "upscale_delay_s": 1}}})
    config = _ingress_config(app)
    scaling = config.autoscaling_config
    assert (scaling.min_replicas, scaling.max_replicas, scaling.target_ongoing_requests) == (2, 5, 16)
    assert scaling.upscale_delay_s == 1
    assert app._bound_deployment.ray_actor_options["num_cpus"] == 0.2
    with pytest.raises(ValueError, match="ingress.autoscaling"):
        app_builder({"products_dir": str(folder), "ingress_replicas": 3})


def test_a_bound_smaller_than_the_ingress_replicas_is_refused() -> None:
    products = tiny_products()
    products["support-chat"] = products["support-chat"].model_copy(update={"max_queue_len": 2})
    wide = IngressConfig(autoscaling=Autoscaling(min_replicas=1, max_replicas=3))
    with pytest.raises(ValueError, match="support-chat"):
        build_app(products, wide)
    build_app(products, IngressConfig(autoscaling=Autoscaling(min_replicas=1, max_replicas=2)))


def test_ingress_autoscaling_takes_no_engine_signals() -> None:
    with pytest.raises(ValidationError, match="signals"):
        IngressConfig(autoscaling=Autoscaling(signals={"kv_usage": 0.5}))

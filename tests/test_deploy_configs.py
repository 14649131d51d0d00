"""The deployment configs: deploy/serve.yaml, the KubeRay RayService and its GPU products.

The static checks parse each file the way its consumer does (Serve's own config
schema, load_products). The last test runs `serve run deploy/serve.yaml` as a
user would, in its own session with its own local Ray, and talks to it through
the official `openai` client.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import openai
import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from cluster.products import ProductConfig, load_products
from tests.process_helpers import STARTUP_TIMEOUT_S, chat, cli, free_port, run_dir, served

REPO = Path(__file__).resolve().parent.parent
SERVE_YAML = REPO / "deploy" / "serve.yaml"
RAYSERVICE_YAML = REPO / "deploy" / "kuberay" / "rayservice.yaml"
IMAGE_ROOT = "/app"  # where the image copies the repository (rayservice.yaml header)
PRODUCTS = {"support-chat", "report-gen"}
ROLES = ("prefill", "decode")
APP = {"name": "pdserve", "route_prefix": "/", "import_path": "cluster.app:app_builder"}


def _products_dir(path: str) -> Path:
    """A products_dir as cluster.app.app_builder resolves it: absolute, else the cwd's, else the repo root's."""
    directory = Path(path)
    return directory if directory.is_absolute() or directory.exists() else REPO / directory


def _check_app(config: ServeDeploySchema) -> dict:
    assert len(config.applications) == 1
    app = config.applications[0]
    assert {"name": app.name, "route_prefix": app.route_prefix, "import_path": app.import_path} == APP
    assert set(app.args) == {"products_dir"}, app.args
    return app.args


# ---- deploy/serve.yaml ------------------------------------------------------------------------------

def test_serve_yaml_validates_and_loads_both_products(monkeypatch, tmp_path):
    config = ServeDeploySchema.model_validate(yaml.safe_load(SERVE_YAML.read_text()))
    assert (config.http_options.host, config.http_options.port) == ("127.0.0.1", 8000)
    args = _check_app(config)
    assert config.applications[0].runtime_env == {}  # the package is pip-installed: no working_dir
    # A relative products_dir works from any directory (it falls back to the repository root).
    monkeypatch.chdir(tmp_path)
    products = load_products(_products_dir(args["products_dir"]))
    assert set(products) == PRODUCTS


# ---- deploy/kuberay/rayservice.yaml -----------------------------------------------------------------

def _manifest() -> tuple[dict, dict]:
    docs = [d for d in yaml.safe_load_all(RAYSERVICE_YAML.read_text()) if d]
    services = [d for d in docs if d.get("kind") == "RayService"]
    assert len(services) == 1, [d.get("kind") for d in docs]
    service = services[0]
    assert service["apiVersion"] == "ray.io/v1"
    claims = {d["metadata"]["name"] for d in docs if d.get("kind") == "PersistentVolumeClaim"}
    return service, {"claims": claims}


def _custom_resources(start_params: dict) -> dict:
    """rayStartParams.resources: a JSON object inside a quoted string, as `ray start --resources` takes it."""
    value = json.loads(start_params["resources"])
    return json.loads(value) if isinstance(value, str) else value


def _gpu_products(service: dict) -> dict[str, ProductConfig]:
    serve_config = ServeDeploySchema.model_validate(yaml.safe_load(service["spec"]["serveConfigV2"]))
    directory = _check_app(serve_config)["products_dir"]
    assert directory.startswith(IMAGE_ROOT + "/"), directory
    return load_products(REPO / Path(directory).relative_to(IMAGE_ROOT))


def test_rayservice_serve_config_and_cluster_shape():
    service, extra = _manifest()
    ServeDeploySchema.model_validate(yaml.safe_load(service["spec"]["serveConfigV2"]))
    cluster = service["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True

    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"  # no engine and no ingress on the head
    assert str(head["rayStartParams"].get("include-dashboard", "true")).lower() == "true"
    for container in head["template"]["spec"]["containers"]:
        assert "nvidia.com/gpu" not in container.get("resources", {}).get("limits", {})

    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    assert set(ROLES) <= set(groups)
    for role in ROLES:
        group = groups[role]
        assert _custom_resources(group["rayStartParams"]) == {f"{role}_node": 1}
        assert 0 <= group["minReplicas"] <= group["maxReplicas"]
        pod = group["template"]["spec"]
        (container,) = pod["containers"]
        for kind in ("limits", "requests"):
            assert int(container["resources"][kind]["nvidia.com/gpu"]) == 1, (role, kind)
        # The models volume: a claim defined in the manifest, mounted at /models.
        assert any(m["mountPath"] == "/models" for m in container["volumeMounts"])
        claims = {v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
        assert claims and claims <= extra["claims"], claims


def test_rayservice_gpu_products_match_worker_groups():
    service, _ = _manifest()
    products = _gpu_products(service)
    assert set(products) == PRODUCTS
    groups = {g["groupName"]: g for g in service["spec"]["rayClusterConfig"]["workerGroupSpecs"]}
    for role in ROLES:
        offered = _custom_resources(groups[role]["rayStartParams"])
        for name, product in products.items():
            spec = getattr(product, role)
            assert spec.num_gpus == 1, (name, role)
            assert spec.resources == offered, (name, role, spec.resources)
        # One engine per pod: the group must be able to grow to every product's max replicas at once.
        needed = sum(getattr(p, role).autoscaling.max_replicas for p in products.values())
        assert groups[role]["maxReplicas"] >= needed, (role, needed)
    for name, product in products.items():
        engine = product.engine_config()
        assert engine.dtype == "bfloat16", name
        assert engine.model and engine.model.startswith("/models/"), name


@pytest.mark.timeout(STARTUP_TIMEOUT_S + 180)
def test_serve_run_deploy_yaml_answers_openai_requests():
    port = free_port()
    config = yaml.safe_load(SERVE_YAML.read_text())
    config["http_options"]["port"] = port
    directory = run_dir()
    (directory / "serve.yaml").write_text(yaml.safe_dump(config))
    # --address local: always a new local Ray, never one already running on the machine (another test's).
    # cwd has no deploy/products: the relative products_dir must resolve against the repository.
    try:
        with served([cli("serve"), "run", "--address", "local", str(directory / "serve.yaml")], port,
                    directory) as base:
            client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=120)
            raw = chat(client, deadline=time.monotonic() + 60)
            assert raw.status_code == 200
            completion = raw.parse()
            assert completion.model == "support-chat"
            assert completion.usage.completion_tokens == 5
            assert completion.choices[0].finish_reason == "length"
    finally:
        shutil.rmtree(directory, ignore_errors=True)

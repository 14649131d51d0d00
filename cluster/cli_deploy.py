"""Deploying pdserve onto a Ray instance for `pdserve up`, from a Ray Serve config file, and taking it down.

Invariants: deploy() returns only once the application is warm and its HTTP address answers; from ray.init
on, a SIGINT or SIGTERM during a deploy raises StopRequested in the main thread, so the caller's cleanup
(shutdown(), a started head stopped) runs; on a one-node cluster this command started, pdserve's own
listeners bind loopback. Direct ingress's settings must be in the environment before Ray starts. Times in
seconds.
"""

from __future__ import annotations

import argparse
import json
import signal
import time
from pathlib import Path
from typing import Any

import yaml

APP_NAME = "pdserve"


def _app_args(config_path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(app_builder args, http_options) of the pdserve application in a Serve config file."""
    config = yaml.safe_load(config_path.read_text())
    for app in config.get("applications", []):
        if app.get("import_path") == "cluster.app:app_builder":
            return dict(app.get("args") or {}), dict(config.get("http_options") or {})
    raise SystemExit(f"{config_path}: no application with import_path cluster.app:app_builder")


# `up --direct-ingress`: the ingress replica may take this many ports from --port on. A replacement replica
# cannot reuse a dead one's port at once (Serve quarantines it), so it takes the next.
DIRECT_INGRESS_PORTS = 4


def http_address(args: argparse.Namespace) -> tuple[str, int]:
    _, http = _app_args(Path(args.config))
    return args.host or http.get("host", "127.0.0.1"), args.port or int(http.get("port", 8000))


def direct_ingress_env(port: int) -> dict[str, str]:
    """Ray Serve's direct ingress (a Serve feature flag in Ray 2.60): every ingress replica serves HTTP itself,
    on a port from [port, port + DIRECT_INGRESS_PORTS), so a request skips the proxy actor's hop. The flag
    must be in the environment of the Serve controller and replicas: set before Ray starts."""
    return {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "1", "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(port),
            "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(port + DIRECT_INGRESS_PORTS - 1),
            # A stopping ingress replica keeps serving this long so an external load balancer can notice
            # (Serve's default 30 s); `up` has no balancer in front, and `down` would wait that long.
            "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2"}


def _free_port(host: str) -> int:
    import socket

    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _served_models(url: str, timeout_s: float = 120.0) -> list[str]:
    """The model ids `url` serves, once it answers (with direct ingress the replica binds its port late)."""
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(f"{url}/v1/models", timeout=5) as response:
                return [model["id"] for model in json.load(response)["data"]]
        except OSError as exc:
            if time.monotonic() > deadline:
                raise SystemExit(f"the ingress replica does not answer at {url}: {exc!r}") from exc
            time.sleep(1)


def deploy(args: argparse.Namespace, blocking_ray_init: dict[str, Any], one_node: bool) -> str:
    """Connect, deploy, warm, print where it serves. one_node: this command started the Ray instance (one
    node, nobody else's): pdserve's own listeners then bind loopback (Ray would not take a loopback node
    address: it resolves 127.0.0.1 to the machine's network address)."""
    import ray
    from ray import serve

    from cluster.app import app_builder

    app_args, _ = _app_args(Path(args.config))
    if one_node:
        app_args.setdefault("token_stream_host", "127.0.0.1")
    host, port = http_address(args)
    ray.init(**blocking_ray_init)
    _interrupt_on_stop_signals()  # ray.init installs handlers that abort the process (exit -6 mid-deploy)
    # With direct ingress the ingress replica takes `port`; Serve still starts its proxy, elsewhere.
    serve.start(http_options={"host": host, "port": _free_port(host) if args.direct_ingress else port})
    print("deploying pdserve (the first start converts the model once, then every engine starts)...", flush=True)
    handle = serve.run(app_builder(app_args), name=APP_NAME, route_prefix="/")
    pinned = handle.warm.remote().result(timeout_s=600)
    print(f"system prompts computed once and pinned: {pinned}")
    url = f"http://{host}:{port}"
    models = _served_models(url)  # never empty: load_products refuses a config without products
    print(f"\npdserve is serving at {url}/v1 (OpenAI-compatible; models {', '.join(models)}); "
          f"metrics at {url}/metrics\n"
          f"  curl {url}/v1/chat/completions -H 'Content-Type: application/json' \\\n"
          f"    -d '{{\"model\": \"{models[0]}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hello\"}}]}}'\n",
          flush=True)
    return url


class StopRequested(BaseException):
    """SIGINT or SIGTERM arrived before `up` had finished deploying. A BaseException, as KeyboardInterrupt is:
    the signal may land inside library code that catches Exception (Serve's controller lookup does, and
    logged "The cached controller has died or is unreachable: SIGTERM" before deploying on as if unasked)."""


def _raise_stop(signum: int, _frame: object) -> None:
    raise StopRequested(signal.Signals(signum).name)


def _interrupt_on_stop_signals() -> None:
    """From here to the end of the deploy, a stop signal raises StopRequested in the main thread, so the
    caller's cleanup (Serve and Ray shut down, a started head stopped) runs."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _raise_stop)


def shutdown() -> None:
    """Shut Serve down on the Ray this process is connected to, then disconnect (a Ray instance this process
    started stops with it); nothing if it is not connected."""
    import ray
    from ray import serve

    if ray.is_initialized():
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


"""The `pdserve` command line: `up`, `status`, `down`, an offline `demo`, and `bench` (bench/load_bench.py)."""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import yaml

from engine.model_store import cache_root

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO / "deploy" / "serve.yaml"
STOP_WAIT_S = 10.0  # how long `down` lets the started head's processes exit on SIGTERM before SIGKILL
APP_NAME = "pdserve"

# Local runs: no usage stats, autoscaling that reacts in seconds (metrics pushed every second). Ray's token
# authentication is on too (ray_auth_env below): Ray's servers listen on every interface whatever address
# the node is given, so without it anyone who reaches the machine could run code in the cluster.
LOCAL_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "1",
    "RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "1",
    # Ray's crash handler would take SIGTERM from us and kill the driver without a clean shutdown.
    "RAY_install_failure_signal_handler": "0",
    # Serve's controller loop every 1 s, not 0.1 s: on a 2-core host its wake-ups preempt the engine's
    # threads (3.9% -> 1.4% of a core, +4% HTTP throughput: BENCHMARKS.md, "Tokens over a direct stream").
    # Autoscaling still waits its upscale/downscale delays (>= 1 s) on top.
    "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "1",
}


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


def _http_address(args: argparse.Namespace) -> tuple[str, int]:
    _, http = _app_args(Path(args.config))
    return args.host or http.get("host", "127.0.0.1"), args.port or int(http.get("port", 8000))


def _direct_ingress_env(port: int) -> dict[str, str]:
    """Ray Serve's direct ingress (a Serve feature flag in Ray 2.60): every ingress replica serves HTTP itself,
    on a port from [port, port + DIRECT_INGRESS_PORTS), so a request skips the proxy actor's hop. The flag
    must be in the environment of the Serve controller and replicas: set before Ray starts."""
    return {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "1", "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(port),
            "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(port + DIRECT_INGRESS_PORTS - 1),
            # A stopping ingress replica keeps serving this long so an external load balancer can notice
            # (Serve's default 30 s); `up` has no balancer in front, and `down` would wait that long.
            "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2"}


def state_dir() -> Path:
    """Where `up` keeps what `status` and `down` need (up.json) and its Ray token: $PDSERVE_STATE_DIR, else
    `state/` in pdserve's cache directory (not the cache directory itself: that one is created readable by
    all). Private (0700) once private_dir() has checked it."""
    env = os.environ.get("PDSERVE_STATE_DIR")
    return Path(env).expanduser() if env else cache_root() / "state"


def _state_file() -> Path:
    return state_dir() / "up.json"


def ray_auth_env() -> dict[str, str]:
    """The Ray authentication settings for a cluster `up` starts or `status`/`down` reach: token mode with
    this user's private token file (created 0600 on first use, in the private state directory), unless the
    environment already chooses (RAY_AUTH_MODE set, or a token given by RAY_AUTH_TOKEN/_PATH)."""
    if "RAY_AUTH_MODE" in os.environ:
        return {}
    if os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return {"RAY_AUTH_MODE": "token"}
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(_token_file())}


def _token_file() -> Path:
    """This user's Ray token file: created private (0600) with a random token; refused (SystemExit) if it
    exists but another user owns it or others can read or write it."""
    path = private_dir(state_dir()) / "ray_auth_token"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        if not _is_private(path):
            raise SystemExit(f"{path} must belong to this user and be private (chmod 600); it is not") from None
    else:
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    return path


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


def _deploy(args: argparse.Namespace, blocking_ray_init: dict[str, Any], one_node: bool) -> str:
    """Connect, deploy, warm, print where it serves. one_node: this command started the Ray instance (one
    node, nobody else's): pdserve's own listeners then bind loopback (Ray would not take a loopback node
    address: it resolves 127.0.0.1 to the machine's network address)."""
    import ray
    from ray import serve

    from cluster.app import app_builder

    app_args, _ = _app_args(Path(args.config))
    if one_node:
        app_args.setdefault("token_stream_host", "127.0.0.1")
    host, port = _http_address(args)
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


class StopRequested(Exception):
    """SIGINT or SIGTERM arrived before `up` had finished deploying."""


def _raise_stop(signum: int, _frame: object) -> None:
    raise StopRequested(signal.Signals(signum).name)


def _interrupt_on_stop_signals() -> None:
    """From here to the end of the deploy, a stop signal raises StopRequested in the main thread, so the
    caller's cleanup (Serve and Ray shut down, a started head stopped) runs."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _raise_stop)


def _up(args: argparse.Namespace) -> int:
    if args.direct_ingress and args.address:
        raise SystemExit("--direct-ingress needs the Ray instance this command starts (not --address): "
                         "Serve reads the flag when its controller starts")
    for key, value in LOCAL_ENV.items():
        os.environ.setdefault(key, value)
    os.environ.update(ray_auth_env())  # before Ray starts: its servers and every worker read it
    if args.direct_ingress:
        os.environ.update(_direct_ingress_env(_http_address(args)[1]))
    if args.detach:
        return _up_detached(args)
    stop = threading.Event()
    init = {"address": args.address or "local", "namespace": "pdserve", "log_to_driver": False}
    if init["address"] == "local":
        init.update(include_dashboard=False, num_cpus=args.num_cpus)
    try:
        _deploy(args, init, one_node=init["address"] == "local")
        for sig in (signal.SIGINT, signal.SIGTERM):  # serving: a stop signal ends the wait below
            signal.signal(sig, lambda *_: stop.set())
        print("Ctrl-C (or SIGTERM) stops everything this command started.", flush=True)
        stop.wait()
    except StopRequested as exc:
        print(f"{exc} while deploying: stopping", flush=True)
    finally:
        _shutdown()
    print("pdserve stopped")
    return 0


def _up_detached(args: argparse.Namespace) -> int:
    """Start a Ray head that outlives this command, deploy, record it for `status` and `down`."""
    address = args.address
    pids: list[int] = []
    if not address:
        private_dir(detached_home())  # Ray makes its own temp dir world-writable: this 0700 parent guards it
        temp_dir = detached_temp_dir()
        # Ray's CLI through this interpreter: its `ray` script is on PATH only in an activated environment
        subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--disable-usage-stats",
                        "--include-dashboard=false", f"--num-cpus={args.num_cpus}", f"--temp-dir={temp_dir}"],
                       check=True, env={**LOCAL_ENV, **os.environ})  # a variable the user set wins
        pids = _head_pids(temp_dir)
    try:
        if pids:
            address = _started_head_address()
        url = _deploy(args, {"address": address, "namespace": "pdserve", "log_to_driver": False},
                      one_node=bool(pids))
    except BaseException as exc:  # a bad config, a failed deploy, Ctrl-C: leave no head behind
        if pids:
            _shutdown()
            _stop_started_head(pids)
        if isinstance(exc, StopRequested):
            raise SystemExit(f"{exc} while deploying: stopped, nothing left running") from None
        raise
    private_dir(state_dir())
    auth = {k: os.environ[k] for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH") if k in os.environ}
    _state_file().write_text(json.dumps({"url": url, "address": address, "started_head": bool(pids), "pids": pids,
                                      "since": time.time(), "ray_auth": auth}))
    print("detached: `pdserve status` shows it, `pdserve down` stops it.")
    return 0


def detached_home() -> Path:
    """This user's private (0700) directory for the head `up --detach` starts; Ray's temp dir lives in it."""
    return Path(tempfile.gettempdir()) / f"pdserve-up-{os.getuid()}"


def detached_temp_dir() -> Path:
    """Ray's temp dir for the head `up --detach` starts: one per user (short: Ray's socket paths must stay
    under 108 characters), so its processes are told apart from any other Ray on the machine. Ray chmods
    it 0777 when it starts; the private detached_home() above it is what keeps other users out."""
    return detached_home() / "ray"


def private_dir(path: Path) -> Path:
    """path, created 0700 if missing; refused (SystemExit) unless this user owns it and nobody else can write
    it or read it: another user could otherwise plant state or sockets there."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if not _is_private(path):
        raise SystemExit(f"{path} must belong to this user and be private (chmod 700); it is not")
    return path


def _is_private(path: Path) -> bool:
    """This user owns path and nobody else can read, write or enter it."""
    info = path.stat()
    return info.st_uid == os.getuid() and not info.st_mode & 0o077


def _head_pids(temp_dir: Path) -> list[int]:
    """Process ids of the Ray head just started in temp_dir (its processes name it in their arguments)."""
    out = subprocess.run(["pgrep", "-u", str(os.getuid()), "-f", str(temp_dir)], capture_output=True, text=True)
    return sorted(int(pid) for pid in out.stdout.split())


def _started_head_address() -> str:
    """The GCS address of the head `ray start` just started in detached_temp_dir(), from the file it writes
    there. Not "auto": that resolves through Ray's default temp dir and may name another cluster on this
    machine (a test session, a user's own Ray), which `up` would then deploy to and `down` stop."""
    record = detached_temp_dir() / "ray_current_cluster"
    if not record.exists():
        raise SystemExit(f"ray start did not record its address in {record}")
    return record.read_text().strip()


def _shutdown() -> None:
    import ray
    from ray import serve

    if ray.is_initialized():
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


def read_state() -> dict[str, Any]:
    """What `up --detach` recorded (url, Ray address, its pids, its Ray authentication settings)."""
    if not _state_file().exists():
        raise SystemExit("no detached pdserve found (start one with `pdserve up --detach`)")
    return json.loads(_state_file().read_text())


def _status(args: argparse.Namespace) -> int:
    state = read_state()
    reach(state)
    import ray  # after reach(): Ray reads its authentication settings when first imported
    from ray import serve

    try:
        status = serve.status()
        app = status.applications.get(APP_NAME)
        print(f"url: {state['url']}")
        if app is None:
            print("application: not deployed")
            return 1
        print(f"application: {_label(app.status)}")
        for name, dep in sorted(app.deployments.items()):
            replicas = ", ".join(f"{_label(state)} {n}" for state, n in dep.replica_states.items())
            print(f"  {name:28s} {_label(dep.status):10s} replicas: {replicas}")
        return 0 if _label(app.status) == "RUNNING" else 1
    finally:
        ray.shutdown()


def reach(state: dict[str, Any]) -> None:
    """Connect to the detached pdserve's Ray with the authentication settings `up` used (recorded in the
    state file; a variable set now wins). Call it before anything imports Ray: Ray reads them then."""
    for key, value in state.get("ray_auth", {}).items():
        os.environ.setdefault(key, value)
    import ray

    ray.init(address=state["address"], namespace="pdserve", log_to_driver=False)


def _label(status: Any) -> str:
    """Serve statuses are str enums in some Ray versions and plain strings in others."""
    return str(getattr(status, "value", status))


def _down(args: argparse.Namespace) -> int:
    state = read_state()
    try:
        reach(state)
        _shutdown()
    except Exception as exc:  # unreachable (a head already gone, a lost token): still stop what `up` started
        print(f"could not reach pdserve's Ray ({type(exc).__name__}: {str(exc)[:200]}); stopping what `up` "
              "started by process id", file=sys.stderr)
    if state.get("started_head"):
        _stop_started_head(state.get("pids", []))
    _state_file().unlink(missing_ok=True)
    print("pdserve stopped")
    return 0


def _stop_started_head(pids: list[int]) -> None:
    """Stop the Ray head `up --detach` started, by the process ids it recorded (`ray stop` would stop every
    Ray on the machine). A pid is signalled only while it still names our temp dir: after a reboot or a
    long time it may belong to something else. SIGTERM, then SIGKILL for what outlives STOP_WAIT_S."""
    ours = str(detached_temp_dir()).encode()

    def alive() -> list[int]:
        left = []
        for pid in pids:
            try:
                if ours in Path(f"/proc/{pid}/cmdline").read_bytes():
                    left.append(pid)
            except OSError:  # gone
                pass
        return left

    for sig, wait_s in ((signal.SIGTERM, STOP_WAIT_S), (signal.SIGKILL, STOP_WAIT_S)):
        for pid in alive():
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        deadline = time.monotonic() + wait_s
        while alive() and time.monotonic() < deadline:
            time.sleep(0.1)


def _demo(args: argparse.Namespace) -> int:
    """Offline generation (default: the built-in tiny model): the engine end to end, no cluster."""
    from engine import LLM, SamplingParams

    llm = LLM(args.model)
    system = "You are the support assistant of a company that runs language models for its customers. "
    prompts = [system + q for q in ("How do I reset my password?", "Why was my invoice higher this month?",
                                    "Write a short report on cache usage.", "What is paged attention?")]
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    for out in outputs:
        print(f"--- prompt ({len(out.prompt_token_ids)} tokens, {out.num_cached_tokens} cached)")
        print(f"{out.prompt!r}\n=> {out.outputs[0].text!r} [{out.outputs[0].finish_reason}]")
    stats = llm.stats()
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    print(f"\n{tokens} tokens in {elapsed:.2f} s; prompt tokens computed {stats.prompt_tokens_computed}, "
          f"from cache {stats.prompt_tokens_cached}; KV blocks free {stats.num_blocks_free}/{stats.num_blocks_total}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    """Load-test an OpenAI-compatible endpoint on this machine (bench/load_bench.py)."""
    from bench.load_bench import run

    return run(args)


def _incident(args: argparse.Namespace) -> int:
    from bench.incident import run

    return run(args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pdserve", description="Disaggregated LLM serving on Ray")
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start the cluster (a local Ray unless --address) and serve until stopped")
    up.add_argument("--config", default=str(DEFAULT_CONFIG), help="Ray Serve config file (deploy/serve.yaml)")
    up.add_argument("--port", type=int, default=None, help="HTTP port (default: the config's, 8000)")
    up.add_argument("--host", default=None, help="HTTP host (default: the config's, 127.0.0.1)")
    up.add_argument("--address", default=None, help="an existing Ray cluster to deploy on")
    up.add_argument("--num-cpus", type=int, default=8, help="logical CPUs of a local Ray (replicas take fractions)")
    up.add_argument("--detach", action="store_true", help="return after deploying; see `status` and `down`")
    up.add_argument("--direct-ingress", action="store_true",
                    help="the ingress replica serves HTTP on --port itself, without Serve's proxy hop (Serve's "
                         "direct ingress; one ingress replica; a replacement takes one of the next "
                         f"{DIRECT_INGRESS_PORTS - 1} ports)")
    up.set_defaults(func=_up)
    sub.add_parser("status", help="state of a detached pdserve").set_defaults(func=_status)
    sub.add_parser("down", help="stop a detached pdserve").set_defaults(func=_down)
    demo = sub.add_parser("demo", help="offline generation with the built-in model (no cluster)")
    demo.add_argument("--model", default=None, help="a model name (smollm2-135m-instruct, tiny, small, ...), a .gguf "
                                                  "file or a local Hugging Face folder (default: tiny)")
    demo.add_argument("--max-tokens", type=int, default=32)
    demo.set_defaults(func=_demo)
    from bench.load_bench import add_arguments as add_bench_arguments

    bench = sub.add_parser("bench", help="load-test an OpenAI-compatible endpoint on 127.0.0.1 (pdserve, vllm serve)")
    add_bench_arguments(bench)
    bench.set_defaults(func=_bench)
    from bench.incident import add_arguments as add_incident_arguments

    incident = sub.add_parser("incident", help="contiguous vs paged KV: real-engine replay + GPU-scale simulation")
    add_incident_arguments(incident)
    incident.set_defaults(func=_incident)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

"""The `pdserve` command line: `up` (and `up --detach`), `status`, `down`, an offline `demo`, `bench`
(bench/load_bench.py) and `incident` (bench/incident.py).

The commands and their arguments only: deploying is cli_deploy.py, the private state and Ray token
cli_state.py, the Ray head of a detached run detached_head.py. Invariants: `up` stops what it started
when it ends; a failed or interrupted `up --detach` stops the head it started; `down` stops only what
`up --detach` recorded.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from cluster.cli_deploy import (
    APP_NAME,
    DIRECT_INGRESS_PORTS,
    StopRequested,
    deploy,
    direct_ingress_env,
    http_address,
    shutdown,
)
from cluster.cli_state import clear_state, ray_auth_env, reach, read_state, write_state
from cluster.detached_head import start_head, started_head_address, stop_started_head

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO / "deploy" / "serve.yaml"

# Local runs: no usage stats, autoscaling that reacts in seconds (metrics pushed every second). Ray's token
# authentication is on too (cli_state.ray_auth_env): Ray's servers listen on every interface whatever address
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


def _up(args: argparse.Namespace) -> int:
    if args.direct_ingress and args.address:
        raise SystemExit("--direct-ingress needs the Ray instance this command starts (not --address): "
                         "Serve reads the flag when its controller starts")
    for key, value in LOCAL_ENV.items():
        os.environ.setdefault(key, value)
    os.environ.update(ray_auth_env())  # before Ray starts: its servers and every worker read it
    if args.direct_ingress:
        os.environ.update(direct_ingress_env(http_address(args)[1]))
    if args.detach:
        return _up_detached(args)
    stop = threading.Event()
    init = {"address": args.address or "local", "namespace": "pdserve", "log_to_driver": False}
    if init["address"] == "local":
        init.update(include_dashboard=False, num_cpus=args.num_cpus)
    try:
        deploy(args, init, one_node=init["address"] == "local")
        for sig in (signal.SIGINT, signal.SIGTERM):  # serving: a stop signal ends the wait below
            signal.signal(sig, lambda *_: stop.set())
        print("Ctrl-C (or SIGTERM) stops everything this command started.", flush=True)
        stop.wait()
    except StopRequested as exc:
        print(f"{exc} while deploying: stopping", flush=True)
    finally:
        shutdown()
    print("pdserve stopped")
    return 0


def _up_detached(args: argparse.Namespace) -> int:
    """Start a Ray head that outlives this command, deploy, record it for `status` and `down`."""
    address = args.address
    pids: list[int] = []
    if not address:
        pids = start_head(args.num_cpus, {**LOCAL_ENV, **os.environ})  # a variable the user set wins
    try:
        if pids:
            address = started_head_address()
        url = deploy(args, {"address": address, "namespace": "pdserve", "log_to_driver": False},
                      one_node=bool(pids))
    except BaseException as exc:  # a bad config, a failed deploy, Ctrl-C: leave no head behind
        if pids:
            shutdown()
            stop_started_head(pids)
        if isinstance(exc, StopRequested):
            raise SystemExit(f"{exc} while deploying: stopped, nothing left running") from None
        raise
    auth = {k: os.environ[k] for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH") if k in os.environ}
    write_state({"url": url, "address": address, "started_head": bool(pids), "pids": pids, "since": time.time(),
                 "ray_auth": auth})
    print("detached: `pdserve status` shows it, `pdserve down` stops it.")
    return 0


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


def _label(status: Any) -> str:
    """Serve statuses are str enums in some Ray versions and plain strings in others."""
    return str(getattr(status, "value", status))


def _down(args: argparse.Namespace) -> int:
    state = read_state()
    try:
        reach(state)
        shutdown()
    except Exception as exc:  # unreachable (a head already gone, a lost token): still stop what `up` started
        print(f"could not reach pdserve's Ray ({type(exc).__name__}: {str(exc)[:200]}); stopping what `up` "
              "started by process id", file=sys.stderr)
    if state.get("started_head"):
        stop_started_head(state.get("pids", []))
    clear_state()
    print("pdserve stopped")
    return 0


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

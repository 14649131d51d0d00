"""The main job: `pdserve up` starts a local Ray and the whole app, serves until SIGTERM, stops everything."""

from __future__ import annotations

import os
import shutil
import signal
import time
from pathlib import Path

import openai
import pytest

from tests.process_helpers import (
    STARTUP_TIMEOUT_S,
    assert_stops_cleanly,
    chat,
    cli,
    free_port,
    run_dir,
    served,
    started,
)


@pytest.mark.timeout(STARTUP_TIMEOUT_S + 180)
def test_pdserve_up_serves_and_stops_cleanly_on_sigterm() -> None:
    port = free_port()
    directory = run_dir()
    try:
        with served([cli("pdserve"), "up", "--port", str(port)], port, directory, signal.SIGTERM) as base:
            client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=120)
            raw = chat(client, deadline=time.monotonic() + 60)
            assert raw.status_code == 200
            completion = raw.parse()
            assert completion.usage.completion_tokens == 5
            _wait_announced(directory)
        assert "pdserve stopped" in (directory / "server.log").read_text()
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.mark.timeout(STARTUP_TIMEOUT_S + 180)
def test_up_direct_ingress_serves_http_from_the_ingress_replica() -> None:
    """`up --direct-ingress`: --port is the ingress replica's own HTTP server, not Serve's proxy."""
    import psutil
    import yaml

    from cluster.app import DEFAULT_PRODUCTS_DIR

    port = free_port()
    directory = run_dir()
    products = directory / "products"
    products.mkdir()
    chat_product = yaml.safe_load((DEFAULT_PRODUCTS_DIR / "support-chat.yaml").read_text())
    (products / "support-chat.yaml").write_text(yaml.safe_dump({**chat_product, "disaggregated": False}))
    (directory / "serve.yaml").write_text(yaml.safe_dump({"applications": [{
        "name": "pdserve", "route_prefix": "/", "import_path": "cluster.app:app_builder",
        "args": {"products_dir": str(products)}}]}))
    try:
        cmd = [cli("pdserve"), "up", "--direct-ingress", "--port", str(port), "--config", str(directory / "serve.yaml")]
        with served(cmd, port, directory, signal.SIGTERM) as base:
            client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=120)
            assert chat(client, deadline=time.monotonic() + 60).parse().usage.completion_tokens == 5
            listeners = [c.pid for c in psutil.net_connections("tcp")
                         if c.status == psutil.CONN_LISTEN and c.laddr.port == port]
            assert listeners, f"nothing listens on {port}"
            assert all("ServeReplica" in " ".join(psutil.Process(pid).cmdline()) for pid in listeners), \
                [psutil.Process(pid).cmdline() for pid in listeners]
            # colocated only: no prefill worker would use a prefix directory, so none is started
            session = os.getsid(listeners[0])
            actors = [" ".join(p.info["cmdline"] or []) for p in psutil.process_iter(["cmdline"])
                      if _sid(p.pid) == session]
            assert not [a for a in actors if "PrefixDirectory" in a], actors
            # The replica answers before `up` finishes deploying; stopping it is tested once it has.
            _wait_announced(directory)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _wait_announced(directory: Path) -> None:
    """Until `up` prints its URL, which it does once it has pinned the system prompts."""
    deadline = time.monotonic() + 60
    while "pdserve is serving at" not in (directory / "server.log").read_text():
        assert time.monotonic() < deadline, "pdserve up never announced its URL"
        time.sleep(0.5)


def _sid(pid: int) -> int | None:
    try:
        return os.getsid(pid)
    except OSError:  # gone meanwhile
        return None


def test_direct_ingress_needs_a_ray_this_command_starts() -> None:
    from cluster.cli import main

    with pytest.raises(SystemExit, match="--direct-ingress needs"):
        main(["up", "--direct-ingress", "--address", "127.0.0.1:6379"])


def test_demo_runs_offline(capsys) -> None:
    from cluster.cli import main

    assert main(["demo", "--max-tokens", "4"]) == 0
    assert "prompt tokens computed" in capsys.readouterr().out


@pytest.mark.timeout(STARTUP_TIMEOUT_S + 180)
def test_detached_up_status_down(tmp_path) -> None:
    """`up --detach` returns once serving; `status` reports every deployment RUNNING; `down` stops it all."""
    import subprocess

    port = free_port()
    env = {**os.environ, "PDSERVE_CACHE_DIR": str(tmp_path)}  # its own state file, not the user's

    def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([cli("pdserve"), *args], env=env, capture_output=True, text=True, timeout=timeout)

    up = run("up", "--detach", "--port", str(port), timeout=STARTUP_TIMEOUT_S)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        assert (tmp_path / "up.json").exists()
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=120)
        assert chat(client, deadline=time.monotonic() + 60).status_code == 200
        status = run("status")
        assert status.returncode == 0, status.stdout + status.stderr
        assert "application: RUNNING" in status.stdout
        assert status.stdout.count("RUNNING") >= 6  # the app, the ingress and both roles of both products
    finally:
        down = run("down")
    assert down.returncode == 0 and "pdserve stopped" in down.stdout, down.stdout + down.stderr
    assert not (tmp_path / "up.json").exists()
    assert run("status").returncode != 0  # nothing left to report on


@pytest.mark.timeout(STARTUP_TIMEOUT_S + 60)
def test_detached_up_that_fails_to_deploy_stops_the_head_it_started(tmp_path) -> None:
    """A deploy that fails after `up --detach` started its Ray head stops that head again: no Ray is left
    running with no state file for `down` to find it by."""
    import subprocess

    from cluster.cli import DETACHED_TEMP_DIR

    config = tmp_path / "serve.yaml"
    config.write_text("applications:\n  - {name: pdserve, route_prefix: /, import_path: \"cluster.app:app_builder\", "
                      f"args: {{products_dir: {tmp_path / 'no-such-dir'}}}}}\n")
    env = {**os.environ, "PDSERVE_CACHE_DIR": str(tmp_path)}
    up = subprocess.run([cli("pdserve"), "up", "--detach", "--port", str(free_port()), "--config", str(config)],
                        env=env, capture_output=True, text=True, timeout=STARTUP_TIMEOUT_S)
    assert up.returncode != 0
    assert "no-such-dir" in up.stderr
    assert not (tmp_path / "up.json").exists()
    left = subprocess.run(["pgrep", "-f", DETACHED_TEMP_DIR], capture_output=True, text=True).stdout.split()
    assert not left, f"processes of the started head still running: {left}"


@pytest.mark.timeout(STARTUP_TIMEOUT_S + 120)
def test_a_stop_signal_while_deploying_stops_cleanly() -> None:
    """SIGTERM after Ray is up but before the deploy finished: a clean stop (exit 0, no Ray left), not an
    abort from Ray's own handler (it exited -6 that way)."""
    directory = run_dir()
    log = directory / "server.log"
    try:
        with started([cli("pdserve"), "up", "--port", str(free_port())], directory) as proc:
            deadline = time.monotonic() + STARTUP_TIMEOUT_S
            while "deploying pdserve" not in log.read_text():
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(0.2)
            assert "pdserve is serving at" not in log.read_text()
            assert_stops_cleanly(proc, signal.SIGTERM, log)
            text = log.read_text()
            assert "SIGTERM while deploying: stopping" in text and "pdserve stopped" in text, text[-3000:]
    finally:
        shutil.rmtree(directory, ignore_errors=True)

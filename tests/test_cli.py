"""The main job: `pdserve up` starts a local Ray and the whole app, serves until SIGTERM, stops everything.

The first test runs the shipped product files (SmolLM2); the others test the command's life cycle on the
built-in tiny model, which starts faster."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

import openai
import pytest

from tests.cluster_helpers import tiny_products, write_serve_config
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
from tests.test_real_model import MAX_NEW, reference_answer


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
            _answers_like_transformers(client)
            _wait_announced(directory)
        assert "pdserve stopped" in (directory / "server.log").read_text()
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.mark.timeout(STARTUP_TIMEOUT_S + 180)
def test_up_direct_ingress_serves_http_from_the_ingress_replica() -> None:
    """`up --direct-ingress`: --port is the ingress replica's own HTTP server, not Serve's proxy."""
    import psutil

    port = free_port()
    directory = run_dir()
    chat_product = tiny_products()["support-chat"].model_copy(update={"disaggregated": False})
    config = write_serve_config(directory, {"support-chat": chat_product})
    try:
        cmd = [cli("pdserve"), "up", "--direct-ingress", "--port", str(port), "--config", str(config)]
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


def _answers_like_transformers(client: openai.OpenAI) -> None:
    """Both shipped products answer in English: greedy, what transformers' generate() answers, ending on the
    model's EOS; the shared system prompt's blocks come from the cache; streaming gives the same text."""
    question = "What is the capital of France?"
    expected, prompt_tokens = reference_answer(question)
    assert "Paris" in expected
    for product in ("support-chat", "report-gen"):
        out = client.chat.completions.create(model=product, messages=[{"role": "user", "content": question}],
                                             max_tokens=MAX_NEW, temperature=0.0)
        assert out.choices[0].message.content == expected and out.choices[0].finish_reason == "stop", product
        assert out.usage.prompt_tokens == prompt_tokens
        assert out.usage.prompt_tokens_details.cached_tokens >= 192  # the pinned system prompt's full blocks
    stream = client.chat.completions.create(model="support-chat", messages=[{"role": "user", "content": question}],
                                            max_tokens=MAX_NEW, temperature=0.0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == expected


def _wait_announced(directory: Path) -> None:
    """Until `up` prints its URL, which it does once it has pinned the system prompts."""
    deadline = time.monotonic() + 60
    while "pdserve is serving at" not in (directory / "server.log").read_text():
        assert time.monotonic() < deadline, "pdserve up never announced its URL"
        time.sleep(0.5)


def _probe_ray(address: str, env: dict[str, str]):
    """Connect to the Ray at address as another client would and run a task, in a fresh process."""
    import subprocess
    import sys

    probe = ("import ray\n"
             f"ray.init(address={address!r}, log_to_driver=False)\n"
             "print('ran a task', ray.get(ray.remote(lambda: 1).remote(), timeout=30))\n")
    try:
        return subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=90)
    except subprocess.TimeoutExpired as exc:  # still retrying to connect: refused too, never admitted
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else exc.stdout or ""
        return subprocess.CompletedProcess(exc.cmd, 1, out, "")


def _ingress_listeners(head_pids: list[int]) -> list[str]:
    """The addresses the TCP listeners of the started head's ingress replica are bound to. Its processes
    are the head's and their descendants (not found by session: a test session's own Ray shares it)."""
    import psutil

    ours: set[int] = set()
    for pid in head_pids:
        try:
            ours |= {pid} | {child.pid for child in psutil.Process(pid).children(recursive=True)}
        except psutil.NoSuchProcess:
            pass
    found = []
    for conn in psutil.net_connections(kind="tcp"):
        if conn.status != psutil.CONN_LISTEN or conn.pid not in ours:
            continue
        try:
            if "ServeReplica:pdserve:ingress" in " ".join(psutil.Process(conn.pid).cmdline()):
                found.append(conn.laddr.ip)
        except psutil.NoSuchProcess:
            pass
    return found


def _sid(pid: int) -> int | None:
    """pid's session id; None once it has exited. A zombie counts as exited: it runs nothing, and where
    the container's init does not reap orphans (a daemonized Ray process's parent), it stays one."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return None if state in ("Z", "X") else os.getsid(pid)
    except (OSError, IndexError):  # gone meanwhile
        return None


def test_private_dirs_refuse_what_others_can_write(tmp_path) -> None:
    from cluster.cli_state import private_dir
    from cluster.detached_head import detached_home, detached_temp_dir

    made = private_dir(tmp_path / "new" / "state")
    assert made.stat().st_mode & 0o777 == 0o700
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)
    with pytest.raises(SystemExit, match="private"):
        private_dir(shared)
    assert str(os.getuid()) in detached_home().name  # one per user, not one fixed shared path
    assert detached_home() in detached_temp_dir().parents  # Ray's temp dir (Ray makes it 0777) sits inside it


def test_ray_auth_defaults_to_a_private_token_in_a_private_state_dir(tmp_path, monkeypatch) -> None:
    """No RAY_AUTH_* set: token mode, with a 0600 token file inside a 0700 directory, even when pdserve's
    cache directory exists readable by all (as the model cache creates it); the same file every time.
    A choice in the environment wins."""
    from cluster.cli_state import ray_auth_env, state_dir

    cache = tmp_path / "cache"
    cache.mkdir(mode=0o755)
    cache.chmod(0o755)
    for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "PDSERVE_STATE_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PDSERVE_CACHE_DIR", str(cache))
    env = ray_auth_env()
    token = Path(env["RAY_AUTH_TOKEN_PATH"])
    assert env["RAY_AUTH_MODE"] == "token" and token.parent == state_dir() == cache / "state"
    assert token.stat().st_mode & 0o777 == 0o600 and token.parent.stat().st_mode & 0o777 == 0o700
    assert len(token.read_text()) == 64 and ray_auth_env() == env  # made once, then reused
    token.chmod(0o644)
    with pytest.raises(SystemExit, match="private"):
        ray_auth_env()
    monkeypatch.setenv("RAY_AUTH_TOKEN", "t" * 64)
    assert ray_auth_env() == {"RAY_AUTH_MODE": "token"}
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert ray_auth_env() == {}


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
    """`up --detach` returns once serving; `status` reports every deployment RUNNING; `down` stops it all.
    Ray's token authentication is on (pdserve's default): a client without the token is refused."""
    import subprocess

    port = free_port()
    # its own state file, not the user's; no virtual environment on PATH (Ray's `ray` script not found there);
    # no RAY_AUTH_* from the test session: pdserve chooses
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    env.update({"PDSERVE_STATE_DIR": str(tmp_path / "state"), "PATH": "/usr/bin:/bin"})

    def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([cli("pdserve"), *args], env=env, capture_output=True, text=True, timeout=timeout)

    config = write_serve_config(tmp_path, tiny_products())  # the life cycle, not the model: the tiny one
    up = run("up", "--detach", "--port", str(port), "--config", str(config), timeout=STARTUP_TIMEOUT_S)
    pids: list[int] = []
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        state = tmp_path / "state"
        assert (state / "up.json").exists() and state.stat().st_mode & 0o777 == 0o700  # private
        pids = json.loads((state / "up.json").read_text())["pids"]
        assert pids and all(_sid(pid) is not None for pid in pids)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=120)
        assert chat(client, deadline=time.monotonic() + 60).status_code == 200
        status = run("status")
        assert status.returncode == 0, status.stdout + status.stderr
        assert "application: RUNNING" in status.stdout
        assert status.stdout.count("RUNNING") >= 6  # the app, the ingress and both roles of both products
        recorded = json.loads((state / "up.json").read_text())
        token_file = Path(recorded["ray_auth"]["RAY_AUTH_TOKEN_PATH"])
        assert recorded["ray_auth"]["RAY_AUTH_MODE"] == "token" and token_file.stat().st_mode & 0o777 == 0o600
        for auth in ({"RAY_AUTH_MODE": "disabled"}, {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "f" * 64}):
            refused = _probe_ray(recorded["address"], {**env, **auth})
            assert refused.returncode != 0 and "ran a task" not in refused.stdout, refused.stdout[-2000:]
        # pdserve's own listener in the ingress (its token streams, opened by the chat above) binds loopback on
        # a one-node cluster. (Ray's servers in that process listen on all interfaces: token auth guards them.)
        listeners = _ingress_listeners(pids)
        assert listeners and not [a for a in listeners if a not in ("0.0.0.0", "::") and not a.startswith("127.")
                                  and a != "::1"], listeners
    finally:
        down = run("down")
    assert down.returncode == 0 and "pdserve stopped" in down.stdout, down.stdout + down.stderr
    assert not (tmp_path / "state" / "up.json").exists()
    assert all(_sid(pid) is None for pid in pids), "a process of the started head outlived `down`"
    assert run("status").returncode != 0  # nothing left to report on


@pytest.mark.timeout(STARTUP_TIMEOUT_S + 60)
def test_detached_up_that_fails_to_deploy_stops_the_head_it_started(tmp_path) -> None:
    """A deploy that fails after `up --detach` started its Ray head stops that head again: no Ray is left
    running with no state file for `down` to find it by."""
    import subprocess

    from cluster.detached_head import detached_temp_dir

    config = tmp_path / "serve.yaml"
    config.write_text("applications:\n  - {name: pdserve, route_prefix: /, import_path: \"cluster.app:app_builder\", "
                      f"args: {{products_dir: {tmp_path / 'no-such-dir'}}}}}\n")
    env = {**os.environ, "PDSERVE_STATE_DIR": str(tmp_path)}
    up = subprocess.run([cli("pdserve"), "up", "--detach", "--port", str(free_port()), "--config", str(config)],
                        env=env, capture_output=True, text=True, timeout=STARTUP_TIMEOUT_S)
    assert up.returncode != 0
    assert "no-such-dir" in up.stderr
    assert not (tmp_path / "up.json").exists()
    left = subprocess.run(["pgrep", "-f", str(detached_temp_dir())], capture_output=True, text=True).stdout.split()
    assert not left, f"processes of the started head still running: {left}"


@pytest.mark.timeout(STARTUP_TIMEOUT_S + 120)
def test_a_stop_signal_while_deploying_is_not_swallowed_by_library_code() -> None:
    """The stop a signal raises mid-deploy passes through code that catches Exception (Serve's does)."""
    from cluster.cli_deploy import StopRequested, _interrupt_on_stop_signals

    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        _interrupt_on_stop_signals()
        with pytest.raises(StopRequested, match="SIGTERM"):
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline:  # the handler runs between bytecodes, soon after the kill
                    time.sleep(0.01)
            except Exception:  # what library code does around a call
                pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


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

"""Run a server command (`serve run`, `pdserve up`) as a user would: its own session, its own local Ray.

`served()` starts it, waits until /v1/models answers, yields the base URL, then stops it with a signal and
checks that nothing of its session (raylet, gcs_server, workers) is left behind.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

STARTUP_TIMEOUT_S = 240


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _session_pids(sid: int) -> list[int]:
    """Processes in session `sid` (the serve run process and every Ray process it started)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[3]) == sid:
            pids.append(int(entry.name))
    return pids


def _session_commands(sid: int) -> list[str]:
    commands = []
    for pid in _session_pids(sid):
        with contextlib.suppress(OSError):
            commands.append(Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:120])
    return commands


def _wait_session_gone(sid: int, timeout_s: float) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while (pids := _session_pids(sid)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return pids


def _kill_session(sid: int) -> None:
    """SIGTERM, then SIGKILL, whatever is left of the session we started."""
    for sig, grace_s in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        pids = _session_pids(sid)
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        _wait_session_gone(sid, grace_s)


@contextlib.contextmanager
def _sigint_not_ignored():
    """Children inherit an ignored SIGINT (pytest started in the background); `serve run` needs it to stop."""
    ignored = (threading.current_thread() is threading.main_thread()
               and signal.getsignal(signal.SIGINT) == signal.SIG_IGN)
    if ignored:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        if ignored:
            signal.signal(signal.SIGINT, signal.SIG_IGN)


def _log_tail(path: Path, lines: int = 40) -> str:
    text = path.read_text(errors="replace") if path.exists() else ""
    return "\n".join(text.splitlines()[-lines:])


def _wait_for_models(url: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"server exited with {proc.returncode}:\n{_log_tail(log)}"
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(1)
    pytest.fail(f"{url} did not answer 200 within {STARTUP_TIMEOUT_S} s:\n{_log_tail(log)}")


def _chat(client: openai.OpenAI, deadline: float):
    """One greedy chat completion; retried while replicas behind the ingress are still starting (503)."""
    while True:
        try:
            return client.chat.completions.with_raw_response.create(
                model="support-chat", messages=[{"role": "user", "content": "How do I rotate an API key?"}],
                max_tokens=5, temperature=0)
        except (openai.InternalServerError, openai.APIConnectionError):
            if time.monotonic() > deadline:
                raise
            time.sleep(1)



def cli(name: str) -> str:
    beside = Path(sys.executable).parent / name  # the one of this interpreter, not a shim's
    return str(beside) if beside.exists() else (shutil.which(name) or pytest.fail(f"`{name}` CLI not found"))


@contextlib.contextmanager
def started(cmd: list[str], run_dir: Path) -> Iterator[subprocess.Popen]:
    """Run cmd in its own session in run_dir (a short /tmp dir: Ray's socket paths are limited to ~107
    bytes), output to run_dir/server.log, on a Ray of its own; every process of the session is killed
    at exit."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "RAY_TMPDIR": str(run_dir)}
    env.pop("RAY_ADDRESS", None)
    with open(run_dir / "server.log", "wb") as out, _sigint_not_ignored():
        proc = subprocess.Popen(cmd, cwd=run_dir, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield proc
    finally:
        _kill_session(proc.pid)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)


def assert_stops_cleanly(proc: subprocess.Popen, stop_signal: int, log: Path) -> None:
    """Send stop_signal; the process exits 0 within 90 s and leaves no process of its session, Ray's
    included."""
    proc.send_signal(stop_signal)
    try:
        assert proc.wait(timeout=90) == 0, f"exit code {proc.returncode}:\n{_log_tail(log)}"
    except subprocess.TimeoutExpired:
        pytest.fail(f"{proc.args[0]} did not exit on signal {stop_signal}:\n{_log_tail(log)}")
    _wait_session_gone(proc.pid, 30)
    left = [c for c in _session_commands(proc.pid) if "raylet" in c or "gcs_server" in c]
    assert not left, f"Ray processes left after the server exited: {left}"


@contextlib.contextmanager
def served(cmd: list[str], port: int, run_dir: Path, stop_signal: int = signal.SIGINT) -> Iterator[str]:
    """cmd started (see `started`) until it serves on port; stopped with stop_signal, cleanly, after the block."""
    log = run_dir / "server.log"
    with started(cmd, run_dir) as proc:
        try:
            base = f"http://127.0.0.1:{port}"
            _wait_for_models(f"{base}/v1/models", proc, log)
            yield base
            assert_stops_cleanly(proc, stop_signal, log)
        finally:
            if proc.poll() is None:
                proc.send_signal(stop_signal)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=30)


def run_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="pdsv-", dir="/tmp"))


def chat(client: openai.OpenAI, deadline: float):
    return _chat(client, deadline)


def free_port() -> int:
    return _free_port()

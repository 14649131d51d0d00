"""The Ray head `pdserve up --detach` starts and `pdserve down` stops, told apart from any other Ray here.

Invariants: the head lives in detached_temp_dir(), one per user, inside the private (0700) detached_home();
its processes are found and stopped by the process ids recorded at start, and a pid is signalled only while
its command line still names that temp dir (`ray stop` would stop every Ray on the machine, and an old pid
may belong to something else by now). Times in seconds.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

from cluster.cli_state import private_dir

STOP_WAIT_S = 10.0  # how long `down` lets the started head's processes exit on SIGTERM before SIGKILL


def detached_home() -> Path:
    """This user's private (0700) directory for the head `up --detach` starts; Ray's temp dir lives in it."""
    return Path(tempfile.gettempdir()) / f"pdserve-up-{os.getuid()}"


def detached_temp_dir() -> Path:
    """Ray's temp dir for the head `up --detach` starts: one per user (short: Ray's socket paths must stay
    under 108 characters), so its processes are told apart from any other Ray on the machine. Ray chmods
    it 0777 when it starts; the private detached_home() above it is what keeps other users out."""
    return detached_home() / "ray"


def start_head(num_cpus: int, env: Mapping[str, str]) -> list[int]:
    """Start a Ray head in detached_temp_dir() that outlives this process, with env as its environment;
    the process ids of what it started."""
    private_dir(detached_home())  # Ray makes its own temp dir world-writable: this 0700 parent guards it
    temp_dir = detached_temp_dir()
    # Ray's CLI through this interpreter: its `ray` script is on PATH only in an activated environment
    subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--disable-usage-stats",
                    "--include-dashboard=false", f"--num-cpus={num_cpus}", f"--temp-dir={temp_dir}"],
                   check=True, env=dict(env))
    return _head_pids(temp_dir)


def _head_pids(temp_dir: Path) -> list[int]:
    """Process ids of the Ray head just started in temp_dir (its processes name it in their arguments)."""
    out = subprocess.run(["pgrep", "-u", str(os.getuid()), "-f", str(temp_dir)], capture_output=True, text=True)
    return sorted(int(pid) for pid in out.stdout.split())


def started_head_address() -> str:
    """The GCS address of the head `ray start` just started in detached_temp_dir(), from the file it writes
    there. Not "auto": that resolves through Ray's default temp dir and may name another cluster on this
    machine (a test session, a user's own Ray), which `up` would then deploy to and `down` stop."""
    record = detached_temp_dir() / "ray_current_cluster"
    if not record.exists():
        raise SystemExit(f"ray start did not record its address in {record}")
    return record.read_text().strip()


def stop_started_head(pids: list[int]) -> None:
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

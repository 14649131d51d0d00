"""What the `pdserve` CLI keeps on this machine: its private state directory, this user's Ray token, and the
record `up --detach` leaves for `status` and `down`.

Invariants: the state directory and everything in it belong to this user and nobody else can read, write or
enter them (0700 directories, a 0600 token file); anything found otherwise is refused with SystemExit, never
used, since another user could plant state or sockets there. The record (up.json) is written by
`up --detach` once it serves and removed by `down`.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any

from engine.model_store import cache_root


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


def write_state(state: dict[str, Any]) -> None:
    """Record a detached pdserve (url, Ray address, its pids, its Ray authentication settings) in the
    private state directory."""
    private_dir(state_dir())
    _state_file().write_text(json.dumps(state))


def read_state() -> dict[str, Any]:
    """What `up --detach` recorded (url, Ray address, its pids, its Ray authentication settings)."""
    if not _state_file().exists():
        raise SystemExit("no detached pdserve found (start one with `pdserve up --detach`)")
    return json.loads(_state_file().read_text())


def clear_state() -> None:
    """Forget the detached pdserve (it has been stopped)."""
    _state_file().unlink(missing_ok=True)


def reach(state: dict[str, Any]) -> None:
    """Connect to the detached pdserve's Ray with the authentication settings `up` used (recorded in the
    state file; a variable set now wins). Call it before anything imports Ray: Ray reads them then."""
    for key, value in state.get("ray_auth", {}).items():
        os.environ.setdefault(key, value)
    import ray

    ray.init(address=state["address"], namespace="pdserve", log_to_driver=False)

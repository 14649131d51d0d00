"""Where built and converted models live on disk, and how a folder gets there exactly once.

Invariants:
- Every folder lives under `<cache>/models/`, where `<cache>` is
  $PDSERVE_CACHE_DIR or ~/.cache/pdserve.
- A folder that exists is complete: it is built in a temporary sibling and
  renamed into place, so a crash mid-build leaves no half folder behind.
- Concurrent builders (several replicas starting on one node) build it once:
  an exclusive lock on `<cache>/locks/<folder name>` serialises them, and
  whoever gets the lock second finds the folder there.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def cache_root() -> Path:
    """$PDSERVE_CACHE_DIR, else ~/.cache/pdserve; models go under its `models/`."""
    env = os.environ.get("PDSERVE_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "pdserve"


def models_dir() -> Path:
    return cache_root() / "models"


def build_once(final: Path, marker: str, build: Callable[[Path], None]) -> str:
    """The folder `final`, calling build(tmp_folder) to make it when `final/marker` is missing.

    build writes every file into the empty folder it is given; the folder is
    then made world-readable (the cache may be shared) and renamed to `final`.
    """
    if (final / marker).is_file():
        return str(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    locks = cache_root() / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    with open(locks / final.name, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (final / marker).is_file():  # built by whoever held the lock before us
            return str(final)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
        try:
            build(tmp)
            # mkdtemp and some writers make owner-only entries; the cache may be shared.
            tmp.chmod(0o755)
            for file in tmp.iterdir():
                file.chmod(0o644)
            if final.exists():  # an incomplete folder from an older layout: replace it
                shutil.rmtree(final)
            os.rename(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return str(final)

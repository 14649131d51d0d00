"""The import graph points one way: cluster -> prefill_workers / decode_workers -> kvtransfer -> engine.

Read from the source (ast), not by importing, so a lazy import inside a function counts too. Within the
workers, decode_workers may import prefill_workers (a decode worker calls a prefill worker), never the
reverse. The engine imports no Ray and no web framework: it runs in any process, a test or a GPU box.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# package -> the repository packages it may import (itself included)
ALLOWED = {
    "engine": {"engine"},
    "kvtransfer": {"kvtransfer", "engine"},
    "prefill_workers": {"prefill_workers", "kvtransfer", "engine"},
    "decode_workers": {"decode_workers", "prefill_workers", "kvtransfer", "engine"},
    "cluster": {"cluster", "decode_workers", "prefill_workers", "kvtransfer", "engine", "bench"},
}
OURS = set(ALLOWED) | {"bench", "tests"}
ENGINE_NEVER = {"ray", "fastapi", "starlette", "grpc", "msgpack"}


def _imports(path: Path) -> set[str]:
    """Top-level package names `path` imports, anywhere in it."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def _modules(package: str) -> list[Path]:
    return sorted((REPO / package).rglob("*.py"))


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_imports_point_one_way(package: str) -> None:
    wrong = {f"{path.relative_to(REPO)} imports {name}" for path in _modules(package)
             for name in _imports(path) & OURS - ALLOWED[package]}
    assert not wrong, sorted(wrong)


def test_the_engine_imports_no_ray_and_no_network_stack() -> None:
    wrong = {f"{path.relative_to(REPO)} imports {name}" for path in _modules("engine")
             for name in _imports(path) & ENGINE_NEVER}
    assert not wrong, sorted(wrong)

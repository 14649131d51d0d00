"""Shared pytest setup.

Without CUDA, Triton kernels can only run in its (slow, numpy-based)
interpreter, chosen by TRITON_INTERPRET=1. @triton.jit picks interpreter or
compiler when the decorator runs, i.e. when a kernel module is imported, so the
variable is set here, before any test module imports triton or engine.kernels.
Importing torch first is safe: the CPU build of torch does not import triton.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# One intra-op thread: on 2 cores shared with Ray workers (and other jobs), two
# threads fighting for a busy core made matmuls up to 10x slower (measured).
torch.set_num_threads(1)

# Ray: token auth off and no usage stats for every cluster a test starts (PLATFORM.md).
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def _ray_session():
    """Shut down whatever Ray instance the session's tests left running."""
    yield
    import ray

    if ray.is_initialized():
        ray.shutdown()


@pytest.fixture
def ray_local(_ray_session):
    """A local Ray instance shared by the session (started on first use: ~5 s, not per test).

    Tests that need their own cluster shape (multi-node) shut it down; the next user restarts it.
    """
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=16, include_dashboard=False, namespace="pdserve",
                 _temp_dir=f"/tmp/pdserve-ray-{os.getpid()}", log_to_driver=False)
    yield ray

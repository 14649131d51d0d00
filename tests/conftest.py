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

# Ray: token auth off and no usage stats for every cluster a test starts (local test clusters only).
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# Serve autoscaling reacts in seconds instead of tens of seconds (metrics pushed every second).
os.environ.setdefault("RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S", "1")
os.environ.setdefault("RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S", "1")

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


@pytest.fixture(scope="session")
def pdserve_url(_ray_session, tmp_path_factory):
    """The whole app (ingress + both products' prefill and decode deployments) on 127.0.0.1, started once.

    Test overrides of deploy/products: report-gen needs an API key; support-chat's queue is short (429
    tests) and its decode deployment autoscales 1 -> 3 quickly (autoscaling test).
    """
    import socket

    import ray
    from ray import serve

    from cluster.app import build_app
    from cluster.products import Autoscaling
    from tests.cluster_helpers import tiny_products

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=16, include_dashboard=False, namespace="pdserve",
                 _temp_dir=f"/tmp/pdserve-ray-{os.getpid()}", log_to_driver=False)
    products = tiny_products()
    chat = products["support-chat"]
    fast = Autoscaling(min_replicas=1, max_replicas=3, target_ongoing_requests=2, upscale_delay_s=1,
                       downscale_delay_s=4, look_back_period_s=2)
    products["support-chat"] = chat.model_copy(update={"max_queue_len": 24,
                                                       "decode": chat.decode.model_copy(update={"autoscaling": fast})})
    report_keys = ("sk-report-test", "sk-report-other")  # two tenants (tests/test_http_api.py)
    products["report-gen"] = products["report-gen"].model_copy(update={"api_keys": report_keys})
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    handle = serve.run(build_app(products, token_stream_host="127.0.0.1"),  # one machine: as `pdserve up`
                       name="pdserve", route_prefix="/")
    handle.warm.remote().result(timeout_s=300)
    yield f"http://127.0.0.1:{port}"
    if ray.is_initialized():
        serve.shutdown()


def pytest_collection_modifyitems(config, items):
    """Tests that build their own Ray cluster shape shut the shared one down: run them last."""
    items.sort(key=lambda item: item.module.__name__.endswith("test_multinode"))

"""KV crosses nodes: a prefill node and a decode node of a simulated multi-node Ray cluster."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import ray
from ray._private.utils import get_ray_address_file
from ray.cluster_utils import Cluster

from engine.config import SamplingParams
from engine.tiny_model import path as model_path
from tests.cluster_helpers import TIMEOUT_S, assert_idle, generate, kill_all, start_decode, start_prefill
from tests.engine_helpers import hf_greedy, random_prompts


@pytest.fixture
def two_node_cluster(_ray_session):
    if ray.is_initialized():
        ray.shutdown()  # this test needs its own cluster shape; the next local-Ray test restarts one
    # Cluster records its address in Ray's default temp dir (not the head's temp_dir), which a fresh
    # machine does not have yet; the record is removed afterwards so nothing later connects to it.
    address_file = Path(get_ray_address_file(None))
    address_file.parent.mkdir(parents=True, exist_ok=True)
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "include_dashboard": False, "temp_dir": f"/tmp/pdserve-ray-mn-{os.getpid()}"})
    cluster.add_node(num_cpus=2, resources={"prefill_node": 1})
    cluster.add_node(num_cpus=2, resources={"decode_node": 1})
    ray.init(address=cluster.address, namespace="pdserve", log_to_driver=False)
    cluster.wait_for_nodes()
    yield cluster
    ray.shutdown()
    cluster.shutdown()
    if address_file.exists() and address_file.read_text() == cluster.address:
        address_file.unlink()


@pytest.mark.parametrize("transport", ["ray", "grpc"])
def test_kv_crosses_nodes(two_node_cluster, transport: str) -> None:
    transfer = {"transport": transport}
    prefill = start_prefill(transfer, directory=False, resources={"prefill_node": 0.1})
    decode = start_decode(prefill, transfer, resources={"decode_node": 0.1})
    try:
        where = ray.get([prefill.__ray_call__.remote(lambda self: ray.get_runtime_context().get_node_id()),
                         decode.__ray_call__.remote(lambda self: ray.get_runtime_context().get_node_id())],
                        timeout=TIMEOUT_S)
        assert where[0] != where[1]
        params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
        for prompt in random_prompts([5, 260], 8192, seed=41):
            out = generate(decode, prompt, params)
            assert out["token_ids"] == hf_greedy(model_path("tiny"), prompt, params.max_tokens)[0]
        stats = ray.get(decode.stats.remote(), timeout=TIMEOUT_S)
        assert stats.remote_prefills == 2 and stats.kv_transfer_bytes > 0
        assert_idle([prefill], [decode])
    finally:
        kill_all(prefill, decode)

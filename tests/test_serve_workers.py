"""The workers as Ray Serve deployments: the same classes, reached through DeploymentHandles."""

from __future__ import annotations

import asyncio

import pytest
from ray import serve
from ray.serve.config import RequestRouterConfig

from cluster.routing import PrefixAffinityRouter
from decode_workers.server import DecodeServer
from engine.config import SamplingParams
from engine.tiny_model import path as model_path
from prefill_workers.server import PrefillServer
from tests.engine_helpers import hf_greedy, random_prompts


@pytest.fixture
def serve_instance(ray_local):
    serve.start(http_options={"host": "127.0.0.1", "port": 0})
    yield serve
    serve.shutdown()


@pytest.mark.parametrize("streamed", [False, True], ids=["whole", "streamed"])
def test_prefill_and_decode_as_serve_deployments(serve_instance, streamed: bool) -> None:
    """Streamed: prefill_stream through a streaming DeploymentHandle, routed by the prefix-affinity router (it
    reads the PrefillRequest argument), every chunk export released on its owner replica afterwards."""
    options = {"ray_actor_options": {"num_cpus": 0.5}, "max_ongoing_requests": 64}
    prefill_options = dict(options)
    engine = None
    if streamed:
        engine = {"max_num_batched_tokens": 16}  # a block per step: a chunk per step
        prefill_options["request_router_config"] = RequestRouterConfig(request_router_class=PrefixAffinityRouter)
    prefill = serve.deployment(PrefillServer).options(name="prefill", **prefill_options).bind(
        engine, {"transport": "ray"})
    decode = serve.deployment(DecodeServer).options(name="decode", **options).bind(
        None, {"transport": "ray"}, prefill, kv_streaming=streamed)
    handle = serve.run(decode, name="workers", route_prefix=None)
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    prompt = random_prompts([70], 8192, seed=51)[0]

    async def run() -> tuple[list[int], object, object]:
        tokens: list[int] = []
        request = {"prompt_token_ids": prompt, "sampling_params": params}
        async for out in handle.options(stream=True).generate.remote(request):
            tokens.extend(out["new_token_ids"])
        prefill_handle = serve.get_deployment_handle("prefill", "workers")
        for _ in range(100):  # the releases are fire and forget
            prefill_stats = await prefill_handle.stats.remote()
            if prefill_stats.exports_alive == 0:
                break
            await asyncio.sleep(0.05)
        return tokens, await handle.stats.remote(), prefill_stats

    tokens, stats, prefill_stats = asyncio.run(run())
    assert tokens == hf_greedy(model_path("tiny"), prompt, params.max_tokens)[0]
    assert stats.remote_prefills == 1 and stats.engine.prompt_tokens_computed == 0
    assert stats.engine.num_blocks_free == stats.engine.num_blocks_total
    assert prefill_stats.exports_alive == 0
    assert (prefill_stats.kv_chunks_published > 0) == streamed

"""The workers as Ray Serve deployments: the same classes, reached through DeploymentHandles."""

from __future__ import annotations

import asyncio

import pytest
from ray import serve

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


def test_prefill_and_decode_as_serve_deployments(serve_instance) -> None:
    options = {"ray_actor_options": {"num_cpus": 0.5}, "max_ongoing_requests": 64}
    prefill = serve.deployment(PrefillServer).options(name="prefill", **options).bind(None, {"transport": "ray"})
    decode = serve.deployment(DecodeServer).options(name="decode", **options).bind(None, {"transport": "ray"},
                                                                                   prefill)
    handle = serve.run(decode, name="workers", route_prefix=None)
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    prompt = random_prompts([70], 8192, seed=51)[0]

    async def run() -> tuple[list[int], object]:
        tokens: list[int] = []
        request = {"prompt_token_ids": prompt, "sampling_params": params}
        async for out in handle.options(stream=True).generate.remote(request):
            tokens.extend(out["new_token_ids"])
        return tokens, await handle.stats.remote()

    tokens, stats = asyncio.run(run())
    assert tokens == hf_greedy(model_path("tiny"), prompt, params.max_tokens)[0]
    assert stats.remote_prefills == 1 and stats.engine.prompt_tokens_computed == 0
    assert stats.engine.num_blocks_free == stats.engine.num_blocks_total

"""The stand-in engine (bench/engine_standin.py): the real scheduler and block pool, step times from a cost
model, never reachable from serving's configuration, and served by the real app over HTTP."""

from __future__ import annotations

import dataclasses

import openai
import pytest
import yaml
from ray import serve

from bench.engine_standin import StandinCost, StandinEngine, StandinRunner, standin_config
from bench.incident_sim import GPUSpec
from bench.standin_app import StandinDecode, StandinPrefill, build_standin_app, standin_products
from cluster.app import DEFAULT_PRODUCTS_DIR
from cluster.deployments import SERVING_WORKERS, DecodeDeployment, PrefillDeployment, WorkerClasses
from cluster.products import load_product
from engine.config import EngineConfig, SamplingParams

APP = "standin"
PROMPT = list(range(100, 164))  # 64 tokens: 4 full blocks of 16


@pytest.fixture(scope="module")
def engine() -> StandinEngine:
    return StandinEngine(EngineConfig(num_kv_blocks=64, max_num_batched_tokens=256))


def _run(engine: StandinEngine, prompts: list[list[int]], max_tokens: int) -> dict[str, list[int]]:
    ids = [engine.add_request(p, SamplingParams(max_tokens=max_tokens)).request_id for p in prompts]
    outputs: dict[str, list[int]] = {}
    while engine.has_unfinished_requests():
        for req in engine.step():
            outputs[req.request_id] = req.output_token_ids
    return {rid: outputs[rid] for rid in ids}


def test_requests_run_through_the_real_scheduler_and_block_pool(engine: StandinEngine) -> None:
    first = _run(engine, [PROMPT + [7]], max_tokens=12)
    again = _run(engine, [PROMPT + [8], PROMPT + [9]], max_tokens=12)
    stats = engine.stats()
    assert all(len(tokens) == 12 for tokens in [*first.values(), *again.values()])  # no end token: max_tokens
    assert not set(engine.eos_token_ids) & {t for tokens in again.values() for t in tokens}
    assert stats.prompt_tokens_cached >= 2 * len(PROMPT)  # the later two found the first one's 4 blocks
    assert stats.num_blocks_free == stats.num_blocks_total  # every block back in the pool
    assert stats.num_requests_running == stats.num_requests_waiting == 0


def test_tokens_are_deterministic_words(engine: StandinEngine) -> None:
    one = _run(engine, [PROMPT], max_tokens=6)
    two = _run(engine, [PROMPT, PROMPT[:20]], max_tokens=6)
    assert list(one.values())[0] == list(two.values())[0] != list(two.values())[1]
    text = engine.tokenizer.decode(list(one.values())[0])
    assert text.isascii() and text.replace(" ", "").isalpha()


def test_step_time_follows_the_cost_model() -> None:
    cost = StandinCost(GPUSpec(), time_scale=2.0)
    slept: list[float] = []
    engine = StandinEngine(EngineConfig(num_kv_blocks=64, enable_prefix_caching=False), cost)
    engine.runner = StandinRunner(cost, sleep=slept.append)  # the declared durations, no wall clock
    _run(engine, [PROMPT], max_tokens=3)
    gpu = GPUSpec()
    prefill = 2 * gpu.prefill_s(len(PROMPT))
    decodes = [2 * gpu.decode_s(1, len(PROMPT) + i) for i in (1, 2)]  # each reads the context so far
    assert slept == pytest.approx([prefill, *decodes])
    assert engine.runner.slept_s == pytest.approx(sum(slept)) and engine.runner.steps == 3


def test_mixed_step_prices_prompt_and_decodes() -> None:
    gpu = GPUSpec()
    assert StandinCost(gpu).step_s(100, 2, 300) == pytest.approx(gpu.prefill_s(100) + gpu.decode_s(1, 300))
    assert StandinCost(gpu).step_s(100, 0, 0) == pytest.approx(gpu.prefill_s(100))
    with pytest.raises(ValueError, match="time_scale"):
        StandinCost(gpu, time_scale=0)


def test_serving_configuration_cannot_select_it(tmp_path) -> None:
    # no product or engine field names an engine class: unknown fields are refused
    shipped = yaml.safe_load((DEFAULT_PRODUCTS_DIR / "support-chat.yaml").read_text())
    for extra in ({"engine": {**shipped["engine"], "standin": True}}, {"standin": True},
                  {"decode": {"engine": {"engine_class": "bench.engine_standin.StandinEngine"}}}):
        path = tmp_path / "product.yaml"
        path.write_text(yaml.safe_dump({**shipped, **extra}))
        with pytest.raises(ValueError):
            load_product(path)
    assert not [f for f in dataclasses.fields(EngineConfig) if "standin" in f.name or "runner" in f.name]
    # what serving deploys is the real workers; only bench code passes others
    assert (SERVING_WORKERS.prefill, SERVING_WORKERS.decode) == (PrefillDeployment, DecodeDeployment)
    assert issubclass(StandinPrefill, PrefillDeployment) and issubclass(StandinDecode, DecodeDeployment)
    with pytest.raises(TypeError):
        WorkerClasses(prefill=StandinEngine)
    with pytest.raises(ValueError, match="stand-in"):
        standin_config(EngineConfig(model="smollm2-135m-instruct"))


def test_the_real_app_serves_http_on_stand_in_engines(pdserve_url: str) -> None:
    products = standin_products(prefill_replicas=2, decode_replicas=2)
    handle = serve.run(build_standin_app(products), name=APP, route_prefix=f"/{APP}")
    try:
        handle.warm.remote().result(timeout_s=120)
        deployments = serve.status().applications[APP].deployments
        assert {n: sum(d.replica_states.values()) for n, d in deployments.items()} == {
            "ingress": 1, "standin-prefill": 2, "standin-decode": 2}
        client = openai.OpenAI(base_url=f"{pdserve_url}/{APP}/v1", api_key="none", max_retries=0, timeout=60)
        chat = client.chat.completions.create(model="standin-support-chat", max_tokens=7,
                                              messages=[{"role": "user", "content": "When are invoices issued?"}])
        assert chat.usage.completion_tokens == 7 and chat.choices[0].message.content
        assert chat.usage.prompt_tokens_details.cached_tokens > 0  # the warmed system prompt
        stream = client.chat.completions.create(model="standin-report-gen", max_tokens=20, stream=True,
                                                stream_options={"include_usage": True},
                                                messages=[{"role": "user", "content": "A report, please."}])
        chunks = list(stream)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text and chunks[-1].usage.completion_tokens == 20
    finally:
        serve.delete(APP)

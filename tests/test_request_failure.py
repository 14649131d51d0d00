"""One request never takes an engine down.

In-range extremes (a temperature of 1e-38, top_p of 1e-300, top_k past the vocabulary, seeds past 64
bits) sample without raising. A request whose own step work fails anyway (its logits NaN, its stop check
raising) ends with finish_reason "error" and frees its blocks; the batch's other requests give exactly
the tokens of a clean run, and the engine loop keeps serving. Over HTTP such a request is a 500 of its
own and bodies the JSON parser refuses are 4xx.
"""

from __future__ import annotations

import asyncio
import json
import urllib.request

import openai
import pytest
import torch

from engine import LLM, SamplingParams
from engine.async_engine import AsyncEngine, RequestFailedError
from engine.config import EngineConfig
from tests.engine_helpers import assert_all_free, random_prompts

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM()


@pytest.fixture(scope="module")
def prompts(llm: LLM) -> list[list[int]]:
    return random_prompts([9, 30, 17], llm.engine.vocab_size, seed=5)


def _tokens(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


def _poison(engine, victim: str, monkeypatch) -> None:
    """Make the logits of request `victim` NaN, inside the real sampler's input."""
    sampler = engine.sampler

    def poisoned(logits: torch.Tensor, requests):
        rows = [i for i, r in enumerate(requests) if r.request_id == victim]
        logits = logits.clone()
        logits[rows] = float("nan")
        return sampler(logits, requests)

    monkeypatch.setattr(engine, "sampler", poisoned)


@pytest.mark.parametrize("temperature", [1e-38, 5e-324, 1e-6])
def test_tiny_temperatures_sample_greedily(llm: LLM, prompts, temperature: float) -> None:
    params = SamplingParams(temperature=temperature, max_tokens=12, ignore_eos=True, seed=3)
    assert _tokens(llm.generate(prompts, params)) == _tokens(llm.generate(prompts, GREEDY))
    assert_all_free(llm)


def test_in_range_extremes_give_answers(llm: LLM, prompts) -> None:
    greedy = _tokens(llm.generate(prompts, GREEDY))
    only_top = SamplingParams(temperature=1.0, top_p=1e-300, max_tokens=12, ignore_eos=True)
    assert _tokens(llm.generate(prompts, only_top)) == greedy  # the top token always stays
    for params in (SamplingParams(temperature=1e308, max_tokens=12, ignore_eos=True),  # ~uniform
                   SamplingParams(temperature=0.7, top_k=10**9, top_p=1.0, max_tokens=12, ignore_eos=True),
                   SamplingParams(temperature=2.0, top_k=1, logprobs=20, max_tokens=12, ignore_eos=True),
                   SamplingParams(temperature=1.0, max_tokens=12, stop=[f"never{i}" for i in range(64)])):
        for out in llm.generate(prompts, params):
            assert out.outputs[0].finish_reason in ("stop", "length") and out.outputs[0].token_ids
    for seed in (2**200 + 7, -5, 2**64 - 1):  # past 64 bits, negative: still a seed, still reproducible
        params = SamplingParams(temperature=1.0, seed=seed, max_tokens=12, ignore_eos=True)
        assert _tokens(llm.generate(prompts, params)) == _tokens(llm.generate(prompts, params))
    assert_all_free(llm)


def test_non_finite_temperature_is_refused() -> None:
    for value in (float("inf"), float("nan")):
        with pytest.raises(ValueError, match="temperature"):
            SamplingParams(temperature=value)


def test_a_request_whose_logits_are_nan_fails_alone(prompts, monkeypatch) -> None:
    llm = LLM()
    clean = _tokens(llm.generate(prompts, GREEDY))
    _poison(llm.engine, "victim", monkeypatch)
    reqs = [llm.engine.add_request(p, GREEDY, request_id=rid) for p, rid in zip(prompts, ("a", "victim", "b"),
                                                                                  strict=True)]
    while llm.engine.has_unfinished_requests():
        llm.engine.step()
    assert reqs[1].status.value == "error" and "not finite" in reqs[1].error
    assert [reqs[0].output_token_ids, reqs[2].output_token_ids] == [clean[0], clean[2]]
    assert llm.stats().num_request_errors == 1
    assert_all_free(llm)
    assert _tokens(llm.generate(prompts, GREEDY)) == clean  # and the engine goes on


def test_a_stop_check_that_raises_fails_only_its_request(prompts, monkeypatch) -> None:
    llm = LLM()
    clean = _tokens(llm.generate(prompts, GREEDY))
    real = llm.engine._find_stop_string

    def broken(req):
        if req.request_id == "victim":
            raise RuntimeError("a stop-string bug")
        return real(req)

    monkeypatch.setattr(llm.engine, "_find_stop_string", broken)
    with_stop = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, stop=["never-seen"])
    reqs = [llm.engine.add_request(p, with_stop, request_id=rid)
            for p, rid in zip(prompts, ("a", "victim", "b"), strict=True)]
    while llm.engine.has_unfinished_requests():
        llm.engine.step()
    assert reqs[1].status.value == "error" and "stop-string bug" in reqs[1].error
    assert [reqs[0].output_token_ids, reqs[2].output_token_ids] == [clean[0], clean[2]]
    assert_all_free(llm)


def test_the_engine_loop_survives_a_failed_request(prompts, monkeypatch) -> None:
    async def run() -> None:
        engine = AsyncEngine(EngineConfig())
        try:
            _poison(engine.engine, "victim", monkeypatch)

            async def collect(rid: str, prompt: list[int]) -> list[int]:
                tokens: list[int] = []
                async for out in engine.generate(prompt, GREEDY, rid):
                    tokens += out.new_token_ids
                return tokens

            results = await asyncio.gather(collect("a", prompts[0]), collect("victim", prompts[1]),
                                           collect("b", prompts[2]), return_exceptions=True)
            assert isinstance(results[1], RequestFailedError) and "not finite" in str(results[1])
            assert all(len(r) == GREEDY.max_tokens for r in (results[0], results[2]))
            assert engine.alive
            assert len(await collect("after", prompts[1])) == GREEDY.max_tokens
            stats = await engine.call(lambda e: e.stats())
            assert stats.num_request_errors == 1 and stats.num_blocks_free == stats.num_blocks_total
        finally:
            engine.shutdown()

    asyncio.run(run())


# ---- over HTTP ---------------------------------------------------------------------------------------------

def _status(url: str, data: bytes) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=data, method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_a_tiny_temperature_answers_and_the_product_stays_up(pdserve_url: str) -> None:
    client = openai.OpenAI(base_url=f"{pdserve_url}/v1", api_key="none", max_retries=0, timeout=120)
    messages = [{"role": "user", "content": "How do I rotate an API key?"}]

    def ask(**kwargs) -> str:
        out = client.chat.completions.create(model="support-chat", messages=messages, max_tokens=8, **kwargs)
        return out.choices[0].message.content

    greedy = ask(temperature=0.0)
    assert ask(temperature=1e-38) == greedy
    stream = client.chat.completions.create(model="support-chat", messages=messages, max_tokens=8,
                                            temperature=1e-38, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == greedy
    assert ask(temperature=0.0) == greedy  # the replicas that served it are still there


def test_json_the_parser_refuses_is_a_4xx(pdserve_url: str) -> None:
    url = f"{pdserve_url}/v1/chat/completions"
    huge = b'{"model": "support-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1' + \
        b"0" * 5000 + b"}"
    status, body = _status(url, huge)
    assert status == 400 and body["error"]["code"] == "invalid_json", body
    deep = b'{"model": "support-chat", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    status, body = _status(url, deep)
    assert status == 400 and body["error"]["code"] == "invalid_json", body


def test_a_failed_request_is_a_500_and_a_failed_worker_a_503() -> None:
    from cluster.worker_streams import worker_failure

    class RemoteError(Exception):  # how Ray hands over a remote exception: the original as `cause`
        def __init__(self, cause: BaseException) -> None:
            super().__init__(str(cause))
            self.cause = cause

    for exc in (RequestFailedError("request 'x' failed: SamplingError"), RemoteError(RequestFailedError("nan"))):
        error = worker_failure(exc, "")
        assert (error.status, error.code) == (500, "request_failed")
    error = worker_failure(RemoteError(RuntimeError("actor died")), " mid-request")
    assert (error.status, error.code) == (503, "worker_failed") and "mid-request" in error.message

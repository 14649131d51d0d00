"""Resuming a request from its prompt plus the tokens already delivered (a decode replica died mid-stream).

A resumed run must give exactly the tokens an uninterrupted run gives after them: greedy trivially, seeded
because the generator replays one vocabulary-sized draw per token already sampled (engine.sampler.replay_draws).
Its outputs start after the resumed tokens; its counts (num_output_tokens, max_tokens) and final text cover
the whole output.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from engine import EngineConfig, SamplingParams
from engine.async_engine import AsyncEngine, StepOutput
from engine.request import Request
from engine.sampler import Sampler, noise_row, replay_draws
from tests.engine_helpers import random_prompts

SEEDED = SamplingParams(temperature=1.0, seed=1234, max_tokens=20, ignore_eos=True, logprobs=2)
GREEDY = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True, logprobs=2)


def test_replayed_draws_continue_the_uninterrupted_stream() -> None:
    vocab = 3000
    uninterrupted = torch.Generator().manual_seed(77)
    rows = [noise_row(uninterrupted, vocab) for _ in range(6)]
    for k in (0, 1, 5):
        resumed = torch.Generator().manual_seed(77)
        replay_draws(resumed, k, vocab)
        assert torch.equal(noise_row(resumed, vocab), rows[k])


def _request(rid: str, params: SamplingParams) -> Request:
    return Request(rid, [1, 2, 3], params, b"", max_total_tokens=4096)


def test_a_resumed_seeded_request_samples_the_next_token_of_the_uninterrupted_run() -> None:
    vocab, k = 2000, 4
    params = SamplingParams(temperature=0.9, top_k=100, seed=5, max_tokens=50)
    logits = [torch.randn(1, vocab, generator=torch.Generator().manual_seed(300 + i)) * 3 for i in range(k + 1)]
    uninterrupted, sampler = _request("whole", params), Sampler(0)
    tokens = [sampler(row, [uninterrupted])[0][0] for row in logits]
    resumed = _request("resumed", params)
    resumed.resume(tokens[:k])
    assert resumed.num_draws_to_replay == k
    assert Sampler(1)(logits[k], [resumed])[0][0] == tokens[k]
    assert resumed.num_draws_to_replay == 0


def test_a_greedy_request_replays_no_draw() -> None:
    req = _request("greedy", SamplingParams(temperature=0.0, seed=5))
    req.resume([7, 8])
    assert req.num_draws_to_replay == 0 and req.output_token_ids == [7, 8] and req.num_resumed_tokens == 2


@pytest.fixture(scope="module")
def engine():
    eng = AsyncEngine(EngineConfig())
    yield eng
    eng.shutdown()


async def _run(engine: AsyncEngine, rid: str, prompt: list[int], params: SamplingParams,
               resume: list[int] | None = None) -> list[StepOutput]:
    return [out async for out in engine.generate(prompt, params, rid, resume_token_ids=resume)]


@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_resumed_run_continues_the_uninterrupted_one_token_for_token(engine, params: SamplingParams) -> None:
    prompt = random_prompts([37], 8192, seed=9)[0]
    k = 7

    async def both() -> tuple[list[StepOutput], list[StepOutput]]:
        whole = await _run(engine, f"whole-{params.seed}", prompt, params)
        tokens = [t for out in whole for t in out.new_token_ids]
        return whole, await _run(engine, f"resumed-{params.seed}", prompt, params, tokens[:k])

    whole, resumed = asyncio.run(both())
    tokens = [t for out in whole for t in out.new_token_ids]
    logprobs = [lp for out in whole for lp in out.new_logprobs]
    assert [t for out in resumed for t in out.new_token_ids] == tokens[k:]
    resumed_logprobs = [lp for out in resumed for lp in out.new_logprobs]
    assert [list(lp) for lp in resumed_logprobs] == [list(lp) for lp in logprobs[k:]]  # the same tokens, in order
    for got, want in zip(resumed_logprobs, logprobs[k:], strict=True):  # recomputed context: float noise only
        assert list(got.values()) == pytest.approx(list(want.values()), abs=1e-4)
    last = resumed[-1]
    assert last.finished and last.finish_reason == "length" and last.num_output_tokens == params.max_tokens
    assert last.num_prompt_tokens == len(prompt) and last.text == whole[-1].text
    stats = asyncio.run(engine.stats())
    assert stats.num_blocks_free == stats.num_blocks_total


def test_a_resume_that_leaves_no_token_to_generate_is_refused(engine) -> None:
    prompt = random_prompts([10], 8192, seed=2)[0]
    with pytest.raises(ValueError, match="max_tokens"):
        asyncio.run(_run(engine, "too-long", prompt, SamplingParams(max_tokens=3), [5, 6, 7]))

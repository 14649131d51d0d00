"""Greedy output equals transformers' generate(), token for token, in float32.

Same weights, ragged prompts of 1 to 600 tokens in one batch; again with
prefix caching over a shared prefix, with a KV budget so small that requests
are preempted and recomputed, and with a token budget so small that prefill
is chunked. Log-probabilities must agree to float32 rounding too: random
weights make token equality alone weak evidence.
"""

from __future__ import annotations

import pytest

from engine import LLM, SamplingParams
from engine.tiny_model import path as model_path
from tests.engine_helpers import assert_all_free, hf_greedy, random_prompts

LENGTHS = [1, 2, 7, 15, 16, 17, 31, 48, 64, 100, 129, 200, 255, 333, 480, 600]
MAX_NEW = 24
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True, logprobs=0)


def _check_against_hf(path: str, prompts: list[list[int]], llm: LLM) -> None:
    outputs = llm.generate(prompts, GREEDY)
    for prompt, out in zip(prompts, outputs, strict=True):
        ref_tokens, ref_logprobs = hf_greedy(path, prompt, MAX_NEW)
        got = out.outputs[0]
        assert got.token_ids == ref_tokens, f"prompt of {len(prompt)} tokens diverged"
        got_lp = [lp[t] for lp, t in zip(got.logprobs, got.token_ids, strict=True)]
        assert got_lp == pytest.approx(ref_logprobs, abs=1e-4)
        assert got.finish_reason == "length"
    assert_all_free(llm)


@pytest.mark.parametrize("name", ["tiny", "tiny-qwen2", "tiny-mistral"])
def test_ragged_batch_matches_transformers(name: str) -> None:
    path = model_path(name)
    llm = LLM(path)
    prompts = random_prompts(LENGTHS, llm.engine.vocab_size, seed=1)
    _check_against_hf(path, prompts, llm)


def test_prefix_caching_matches_transformers() -> None:
    path = model_path("tiny")
    llm = LLM(path, enable_prefix_caching=True)
    vocab = llm.engine.vocab_size
    shared = random_prompts([220], vocab, seed=2)[0]
    prompts = random_prompts(LENGTHS, vocab, seed=3, prefix=shared)
    _check_against_hf(path, prompts[:8], llm)  # first wave fills the cache
    _check_against_hf(path, prompts[8:], llm)  # second wave hits it
    assert llm.stats().prefix_cache_hits >= 8 * (220 // 16) * 16


def test_preemption_matches_transformers() -> None:
    path = model_path("tiny")
    # 90 blocks of 16 = 1,440 slots: far less than the batch needs at once, enough for any one request.
    llm = LLM(path, num_kv_blocks=90, enable_prefix_caching=False)
    prompts = random_prompts(LENGTHS, llm.engine.vocab_size, seed=4)
    _check_against_hf(path, prompts, llm)
    assert llm.stats().num_preemptions > 0


def test_chunked_prefill_matches_transformers() -> None:
    path = model_path("tiny")
    llm = LLM(path, max_num_batched_tokens=48)
    prompts = random_prompts(LENGTHS, llm.engine.vocab_size, seed=5)
    steps = []
    original = llm.engine.scheduler.schedule

    def spy():
        out = original()
        steps.append(out.num_tokens)
        return out

    llm.engine.scheduler.schedule = spy
    _check_against_hf(path, prompts, llm)
    assert max(steps) <= 48
    # the 600-token prompt alone needs 13 chunks of at most 48 tokens
    assert len(steps) >= 600 // 48


def test_block_size_and_budget_variants_match() -> None:
    path = model_path("tiny")
    llm = LLM(path, block_size=8, num_kv_blocks=200, max_num_batched_tokens=100)
    prompts = random_prompts(LENGTHS[::2], llm.engine.vocab_size, seed=6)
    _check_against_hf(path, prompts, llm)


def test_greedy_outputs_vary() -> None:
    """The built-in model must not repeat one token, or equality above proves little."""
    path = model_path("tiny")
    llm = LLM(path)
    prompts = random_prompts([10, 50, 90], llm.engine.vocab_size, seed=7)
    outs = llm.generate(prompts, GREEDY)
    for out in outs:
        assert len(set(out.outputs[0].token_ids)) >= MAX_NEW // 3
    assert len({tuple(o.outputs[0].token_ids) for o in outs}) == len(prompts)

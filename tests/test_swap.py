"""Swap-out preemption: a preempted request's KV copied to host memory and written back, not recomputed.

Greedy output still equals transformers' generate() token for token, while the prompt tokens computed stay
exactly the prompts' (nothing recomputed); the host space bounds what is swapped; the measured costs choose
between swapping and recomputing; a request that ends while swapped out gives its host space back.
"""

from __future__ import annotations

import pytest

from engine import LLM, SamplingParams
from engine.config import EngineConfig
from engine.step_cost import StepCost
from engine.swap_space import SwapSpace
from engine.tiny_model import path as model_path
from tests.engine_helpers import assert_all_free, hf_greedy, random_prompts

LENGTHS = [1, 2, 7, 15, 16, 17, 31, 48, 64, 100, 129, 200, 255, 333, 480, 600]
MAX_NEW = 24
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)
GiB = 1 << 30


def _tight(swap_space_bytes: int) -> LLM:
    # 90 blocks of 16 = 1,440 slots: far less than the batch needs at once, enough for any one request.
    return LLM(model_path("tiny"), num_kv_blocks=90, enable_prefix_caching=False, swap_space_bytes=swap_space_bytes)


def test_swapped_requests_match_transformers_and_compute_each_prompt_once() -> None:
    llm = _tight(GiB)
    prompts = random_prompts(LENGTHS, llm.engine.vocab_size, seed=4)
    outputs = llm.generate(prompts, GREEDY)
    for prompt, out in zip(prompts, outputs, strict=True):
        assert out.outputs[0].token_ids == hf_greedy(model_path("tiny"), prompt, MAX_NEW)[0]
    stats = llm.stats()
    assert stats.num_preemptions > 0 and stats.num_swap_outs == stats.num_preemptions
    assert stats.prompt_tokens_computed == sum(LENGTHS)  # swapped back in, never recomputed
    assert llm.engine.scheduler.swap.used_bytes == 0
    assert_all_free(llm)


def test_without_swap_space_preemption_recomputes() -> None:
    llm = _tight(0)
    prompts = random_prompts(LENGTHS, llm.engine.vocab_size, seed=4)
    llm.generate(prompts, GREEDY)
    stats = llm.stats()
    assert stats.num_preemptions > 0 and stats.num_swap_outs == 0
    assert stats.prompt_tokens_computed > sum(LENGTHS)
    assert_all_free(llm)


def test_space_smaller_than_one_request_swaps_nothing() -> None:
    llm = _tight(1)
    llm.generate(random_prompts(LENGTHS, llm.engine.vocab_size, seed=4), GREEDY)
    assert llm.stats().num_preemptions > 0 and llm.stats().num_swap_outs == 0
    assert_all_free(llm)


def test_the_measured_costs_choose() -> None:
    cost = StepCost()
    space = SwapSpace(capacity_bytes=10_000)
    assert not space.choose_swap(0, 100, cost)  # nothing computed: nothing to keep
    assert space.choose_swap(16, 1_000, cost)  # a cost unknown: swap, and learn the copy rate
    space.observe_copy(1_000, 1.0)  # a slow copy: 1 kB/s
    cost.observe(0, 1_000, 1.0)  # 1 ms per prompt token
    assert not space.choose_swap(16, 1_000, cost)  # 2 s of copying out and in against 16 ms of recompute
    assert space.choose_swap(16, 7, cost)  # 14 ms against 16 ms
    assert not space.choose_swap(10, 9_000, cost)  # over the space left
    assert space.used_bytes == 1_007 and space.num_swap_outs == 2
    space.release(1_007)
    assert space.used_bytes == 0


def test_a_request_aborted_while_swapped_out_frees_its_host_space() -> None:
    llm = _tight(GiB)
    engine = llm.engine
    prompts = random_prompts(LENGTHS, engine.vocab_size, seed=4)
    ids = [engine.add_request(p, GREEDY).request_id for p in prompts]
    while not any(r.swap_bytes for r in engine.scheduler.waiting):
        engine.step()
    swapped = next(r for r in engine.scheduler.waiting if r.swap_bytes)
    assert swapped.pending_kv is not None and engine.scheduler.swap.used_bytes >= swapped.swap_bytes
    for rid in ids:
        engine.abort_request(rid)
    assert engine.scheduler.swap.used_bytes == 0 and swapped.pending_kv is None
    assert_all_free(llm)


def test_swap_space_needs_the_paged_layout() -> None:
    with pytest.raises(ValueError, match="swap_space_bytes"):
        EngineConfig(kv_layout="contiguous", enable_prefix_caching=False, swap_space_bytes=GiB)

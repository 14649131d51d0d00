"""Prefix caching: a shared 220-token system prompt is computed once; salts isolate tenants."""

from __future__ import annotations

from engine import LLM, SamplingParams
from tests.engine_helpers import assert_all_free, random_prompts

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


def _system_and_users(llm: LLM) -> tuple[list[int], list[list[int]]]:
    vocab = llm.engine.vocab_size
    system = random_prompts([220], vocab, seed=11)[0]
    return system, random_prompts([30, 45], vocab, seed=12, prefix=system)


def test_second_request_computes_only_its_suffix() -> None:
    llm = LLM()
    _, (first, second) = _system_and_users(llm)
    cold = LLM(enable_prefix_caching=False).generate([second], GREEDY)[0]
    llm.generate([first], GREEDY)
    before = llm.stats()
    out = llm.generate([second], GREEDY)[0]
    after = llm.stats()
    cached = (220 // 16) * 16  # only full blocks are shared: 13 blocks = 208 tokens
    assert out.num_cached_tokens == cached
    assert after.prompt_tokens_computed - before.prompt_tokens_computed == len(second) - cached
    assert after.prefix_cache_hits - before.prefix_cache_hits == cached
    assert out.outputs[0].token_ids == cold.outputs[0].token_ids
    assert_all_free(llm)


def test_different_cache_salt_gets_no_hit() -> None:
    llm = LLM()
    _, (first, second) = _system_and_users(llm)
    llm.generate([{"prompt_token_ids": first, "cache_salt": "product-a"}], GREEDY)
    other = llm.generate([{"prompt_token_ids": second, "cache_salt": "product-b"}], GREEDY)[0]
    same = llm.generate([{"prompt_token_ids": second, "cache_salt": "product-a"}], GREEDY)[0]
    assert other.num_cached_tokens == 0
    assert same.num_cached_tokens == 208
    assert other.outputs[0].token_ids == same.outputs[0].token_ids
    assert_all_free(llm)


def test_identical_prompt_reuses_all_but_the_last_token() -> None:
    llm = LLM()
    prompt = random_prompts([64], llm.engine.vocab_size, seed=13)[0]
    a = llm.generate([prompt], GREEDY)[0]
    b = llm.generate([prompt], GREEDY)[0]
    assert b.num_cached_tokens == 48  # one token must be computed for logits: the last full block is redone
    assert a.outputs[0].token_ids == b.outputs[0].token_ids


def test_parallel_samples_share_prompt_blocks() -> None:
    llm = LLM(enable_prefix_caching=True)
    prompt = random_prompts([160], llm.engine.vocab_size, seed=14)[0]
    params = SamplingParams(n=4, temperature=1.0, seed=7, max_tokens=8, ignore_eos=True)
    out = llm.generate([prompt], params)[0]
    stats = llm.stats()
    assert len(out.outputs) == 4
    # prompt computed once plus the last-token recompute of each sibling: 160 + 3 * 16 at most
    assert stats.prompt_tokens_computed <= 160 + 3 * 16
    assert len({tuple(o.token_ids) for o in out.outputs}) > 1
    again = llm.generate([prompt], params)[0]
    assert [o.token_ids for o in again.outputs] == [o.token_ids for o in out.outputs]
    assert_all_free(llm)


def test_prefix_cache_disabled_gets_no_hits() -> None:
    llm = LLM(enable_prefix_caching=False)
    _, (first, second) = _system_and_users(llm)
    llm.generate([first, second], GREEDY)
    stats = llm.stats()
    assert stats.prefix_cache_hits == 0 and stats.prompt_tokens_computed == len(first) + len(second)

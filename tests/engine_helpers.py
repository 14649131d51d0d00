"""Shared helpers for engine tests: the transformers oracle and the all-blocks-free invariant."""

from __future__ import annotations

import functools

import torch
from transformers import AutoModelForCausalLM

from engine import LLM


@functools.cache
def hf_model(path: str) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager", dtype=torch.float32).eval()


@torch.inference_mode()
def hf_greedy(path: str, prompt: list[int], max_new_tokens: int) -> tuple[list[int], list[float]]:
    """transformers' own generate(), greedy, one prompt (no padding): tokens and their logprobs."""
    model = hf_model(path)
    out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False,
                         eos_token_id=None, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    tokens = out.sequences[0, len(prompt):].tolist()
    logprobs = [float(torch.log_softmax(s[0].float(), -1)[t]) for s, t in zip(out.scores, tokens, strict=True)]
    return tokens, logprobs


def random_prompts(lengths: list[int], vocab: int, seed: int, prefix: list[int] | None = None) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [(prefix or []) + torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def random_paged_batch(seq_lens: list[int], block_size: int, num_kv_heads: int, group: int, head_dim: int,
                       dtype: torch.dtype = torch.float32, seed: int = 0):
    """Random query, caches and a scattered block table for the given context lengths (decode shapes).

    Every sequence gets its blocks from one random permutation of the cache, so
    tables are non-sequential and shared by no two sequences; rows are padded
    with block 0 plus one spare column, like the engine's. The whole cache is
    random, so reading any slot past a sequence's end (or before its window)
    changes the result. Returns query [B, Hkv * group, D], k_cache, v_cache
    [num_blocks, block_size, Hkv, D], block_tables [B, max_blocks + 1], seq_lens [B].
    """
    gen = torch.Generator().manual_seed(seed)
    blocks_per_seq = [(n + block_size - 1) // block_size for n in seq_lens]
    num_blocks = sum(blocks_per_seq) + 3  # a few never-referenced blocks
    perm = torch.randperm(num_blocks, generator=gen)
    table = torch.zeros(len(seq_lens), max(blocks_per_seq) + 1, dtype=torch.int64)
    used = 0
    for i, nb in enumerate(blocks_per_seq):
        table[i, :nb] = perm[used:used + nb]
        used += nb
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=gen).to(dtype)
    v_cache = torch.randn(shape, generator=gen).to(dtype)
    query = torch.randn(len(seq_lens), num_kv_heads * group, head_dim, generator=gen).to(dtype)
    return query, k_cache, v_cache, table, torch.tensor(seq_lens, dtype=torch.int64)


def assert_all_free(llm: LLM) -> None:
    """After every request ended: no request state, every block back in the pool."""
    stats = llm.stats()
    assert stats.num_requests_running == 0 and stats.num_requests_waiting == 0
    assert stats.num_requests_deferred == 0 and stats.num_requests_held == 0
    assert stats.num_blocks_free == stats.num_blocks_total, f"{stats.num_blocks_total - stats.num_blocks_free} leaked"
    assert not llm.engine.requests
    llm.engine.kv.check_invariants()  # paged: the block pool's; contiguous: the allocator's

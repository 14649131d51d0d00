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


def assert_all_free(llm: LLM) -> None:
    """After every request ended: no request state, every block back in the pool."""
    stats = llm.stats()
    assert stats.num_requests_running == 0 and stats.num_requests_waiting == 0
    assert stats.num_requests_deferred == 0 and stats.num_requests_held == 0
    assert stats.num_blocks_free == stats.num_blocks_total, f"{stats.num_blocks_total - stats.num_blocks_free} leaked"
    assert not llm.engine.requests
    llm.engine.kv.check_invariants()  # paged: the block pool's; contiguous: the allocator's

"""The Triton prefill kernel (engine.kernels.paged_prefill_attention) against the torch prefill path.

Reference: for each packed sequence, its context gathered from the paged
cache (gather_context) through prefill_attention_torch. Without CUDA the kernel
runs in Triton's interpreter (tests/conftest.py), so shapes stay tiny; several
sequences share each call so one launch covers many (chunk, cached) cases.
Last, the engine with attention_backend="triton" against transformers, with
chunked prefill and prefix-cache hits, checking that prefill went through the
kernel and never through the torch path.
"""

from __future__ import annotations

import pytest
import torch

import engine.attention as attention
from engine import LLM, SamplingParams
from engine.attention import gather_context, prefill_attention_torch
from engine.kernels import paged_prefill_attention
from engine.kernels.prefill_attention import BLOCK_M, TILE_N
from engine.tiny_model import path as model_path
from tests.engine_helpers import assert_all_free, hf_greedy, random_paged_batch, random_prompts

NUM_KV_HEADS = 2
HEAD_DIM = 16
# bf16 keeps 8 significant bits: rounding the output costs up to 2**-9 relative, and rounding the
# probabilities to bf16 before the P.V dot (as tensor cores do) up to 2**-9 of max|v| more; with
# |v| < ~4 for these random caches that is < 1e-2 in the worst case. 2e-2 leaves a 2x margin and is
# still far below what a wrong key, block or mask costs (O(0.1..1)). fp16 has 11 bits: 8x tighter.
BF16_TOL = 2e-2
FP16_TOL = 3e-3


def _prefill_batch(chunks: list[tuple[int, int]], block_size: int, group: int, head_dim: int = HEAD_DIM,
                   dtype: torch.dtype = torch.float32, seed: int = 0):
    """chunks: (new tokens, cached tokens before them) per sequence. Query rows packed back to back."""
    seq_lens = [q + cached for q, cached in chunks]
    _, k_cache, v_cache, table, lens = random_paged_batch(seq_lens, block_size, NUM_KV_HEADS, group, head_dim,
                                                           dtype, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    q_lens = [q for q, _ in chunks]
    query = torch.randn(sum(q_lens), NUM_KV_HEADS * group, head_dim, generator=gen).to(dtype)
    query_start = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    return query, k_cache, v_cache, table, query_start, lens


def _reference(query, k_cache, v_cache, table, query_start, seq_lens, scale, window) -> torch.Tensor:
    out = torch.empty(query.shape, dtype=torch.float32)
    for i in range(len(seq_lens)):
        rows = slice(int(query_start[i]), int(query_start[i + 1]))
        n = int(seq_lens[i])
        k = gather_context(k_cache, table[i], n).float()
        v = gather_context(v_cache, table[i], n).float()
        out[rows] = prefill_attention_torch(query[rows].float(), k, v, n, scale, window)
    return out


def _check(chunks, block_size, group, window, head_dim=HEAD_DIM, dtype=torch.float32, tol=1e-5, seed=0) -> None:
    batch = _prefill_batch(chunks, block_size, group, head_dim, dtype, seed)
    scale = head_dim ** -0.5
    got = paged_prefill_attention(*batch, scale, window)
    assert got.shape == batch[0].shape and got.dtype == dtype
    torch.testing.assert_close(got.float(), _reference(*batch, scale, window), rtol=tol, atol=tol)


def _chunks_for(block_size: int) -> list[tuple[int, int]]:
    # (new, cached): one token fresh and after a partial block; a chunk shorter than a block;
    # several blocks, non-multiples; after exactly one block, a partial one and several; and one
    # longer than a query tile of the widest kernel shape (BLOCK_M tokens when group == 1).
    return [(1, 0), (1, block_size // 2 + 1), (block_size - 3, 0), (3 * block_size + 3, 0),
            (5, block_size), (block_size + 1, block_size // 2), (2 * block_size, 3 * block_size + 2),
            (BLOCK_M + 5, 7)]


@pytest.mark.parametrize("window", [None, 7])
@pytest.mark.parametrize("group", [1, 2, 4])
@pytest.mark.parametrize("block_size", [8, 16, 32])
def test_prefill_matches_torch(block_size: int, group: int, window: int | None) -> None:
    _check(_chunks_for(block_size), block_size, group, window, seed=block_size * 10 + group)


@pytest.mark.parametrize("window", [1, TILE_N, TILE_N + 1, 40, 41, 10_000])
def test_prefill_window_edges(window: int) -> None:
    # 1: each query sees only itself; TILE_N, TILE_N + 1: the window starts on / just past a key
    # tile boundary; 40: the first chunk's last query exactly fills its window (context 40), 41: one
    # more than that; 10_000: wider than any context (the same as no window).
    chunks = [(40, 0), (9, 31), (1, 40), (33, 20)]
    _check(chunks, 16, group=2, window=window, seed=window)


@pytest.mark.parametrize("head_dim", [24, 80])
def test_prefill_padded_head_dim(head_dim: int) -> None:
    # Padded inside the kernel to 32 and 128.
    _check([(7, 0), (20, 13)], 8, group=4, window=None, head_dim=head_dim, seed=head_dim)


@pytest.mark.parametrize(("dtype", "tol"), [(torch.bfloat16, BF16_TOL), (torch.float16, FP16_TOL)])
def test_prefill_16_bit(dtype: torch.dtype, tol: float) -> None:
    # Against fp32 attention of the same (rounded) inputs: what remains is the kernel's own rounding.
    _check([(3, 0), (17, 9), (40, 24)], 16, group=2, window=None, dtype=dtype, tol=tol, seed=11)
    _check([(3, 0), (17, 9)], 8, group=4, window=5, dtype=dtype, tol=tol, seed=12)


def test_prefill_into_strided_out_and_query() -> None:
    """Writes only its rows of a larger output; query and out may be non-contiguous views."""
    query, k_cache, v_cache, table, query_start, seq_lens = _prefill_batch([(6, 3), (11, 0)], 8, group=2, seed=4)
    query = query.transpose(0, 1).contiguous().transpose(0, 1)  # same values, token stride 1
    assert not query.is_contiguous()
    big = torch.full((query.shape[1], query.shape[0] + 4, HEAD_DIM), 7.0)
    out = big.transpose(0, 1)[2:-2]  # [T, H, D] inside a [H, T + 4, D] buffer
    paged_prefill_attention(query, k_cache, v_cache, table, query_start, seq_lens, 0.3, None, out=out)
    torch.testing.assert_close(out, _reference(query, k_cache, v_cache, table, query_start, seq_lens, 0.3, None),
                               rtol=1e-5, atol=1e-5)
    assert bool((big[:, :2] == 7.0).all()) and bool((big[:, -2:] == 7.0).all())


def test_prefill_empty() -> None:
    _, k_cache, v_cache, table, _, _ = _prefill_batch([(1, 0)], 8, group=1)
    query = torch.empty(0, NUM_KV_HEADS, HEAD_DIM)
    out = paged_prefill_attention(query, k_cache, v_cache, table[:0], torch.zeros(1, dtype=torch.int32),
                                  torch.zeros(0, dtype=torch.int64), 1.0)
    assert out.shape == (0, NUM_KV_HEADS, HEAD_DIM)


# --- the engine with attention_backend="triton" --------------------------------------------------

@pytest.mark.parametrize("name", ["tiny", "tiny-mistral"])
def test_engine_triton_backend_matches_transformers(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """Greedy tokens equal transformers' generate() with every prefill chunk in the Triton kernel.

    A token budget of 24 chunks the prompts (chunks after earlier chunks), and the second
    wave shares a 40-token prefix with the first, so its chunks start after prefix-cache hits.
    tiny-mistral has a 32-token sliding window, shorter than most of these prompts.
    """
    calls = []
    kernel = paged_prefill_attention

    def counting(*args, **kwargs):
        calls.append(args[0].shape[0])
        return kernel(*args, **kwargs)

    def forbidden(*_args, **_kwargs):
        raise AssertionError("prefill took the torch path under attention_backend='triton'")

    monkeypatch.setattr("engine.kernels.paged_prefill_attention", counting)
    monkeypatch.setattr(attention, "prefill_attention_torch", forbidden)
    path = model_path(name)
    llm = LLM(path, attention_backend="triton", max_num_batched_tokens=24, enable_prefix_caching=True,
              block_size=16)
    vocab = llm.engine.vocab_size
    shared = random_prompts([40], vocab, seed=21)[0]
    params = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)
    for wave in (random_prompts([3, 30], vocab, seed=22, prefix=shared),
                 random_prompts([9, 1], vocab, seed=23, prefix=shared)):
        outputs = llm.generate(wave, params)
        for prompt, out in zip(wave, outputs, strict=True):
            assert out.outputs[0].token_ids == hf_greedy(path, prompt, 5)[0], f"prompt of {len(prompt)} diverged"
    assert llm.stats().prefix_cache_hits >= 2 * 32  # two whole blocks of the shared prefix, per request
    assert calls and max(calls) <= 24
    assert_all_free(llm)


def test_engine_triton_backend_under_preemption_matches_transformers() -> None:
    """Few KV blocks: sequences are preempted and recomputed through the Triton kernels, and still
    give transformers' greedy tokens."""
    path = model_path("tiny")
    llm = LLM(path, attention_backend="triton", num_kv_blocks=10, max_num_batched_tokens=32,
              enable_prefix_caching=False, block_size=16)
    prompts = random_prompts([40, 35, 30], llm.engine.vocab_size, seed=31)
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)  # 15 blocks wanted, 10 held
    outputs = llm.generate(prompts, params)
    assert llm.stats().num_preemptions > 0
    for prompt, out in zip(prompts, outputs, strict=True):
        assert out.outputs[0].token_ids == hf_greedy(path, prompt, 40)[0]
    assert_all_free(llm)


# bfloat16 keeps 8 significant bits: a logit near 10 is known to 0.0625. Two paths that round in different
# places (our kernels vs transformers' eager attention) may pick different tokens only where transformers'
# own top two logits are within a few such steps: a near-tie.
BF16_NEAR_TIE = 0.25


def test_engine_triton_backend_in_bfloat16_parts_from_transformers_only_at_near_ties() -> None:
    from transformers import AutoModelForCausalLM

    path = model_path("tiny")
    llm = LLM(path, attention_backend="triton", dtype="bfloat16", max_num_batched_tokens=24, block_size=16)
    prompts = random_prompts([40, 17, 5], llm.engine.vocab_size, seed=41)
    outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, local_files_only=True).eval()
    for prompt, out in zip(prompts, outputs, strict=True):
        ours = out.outputs[0].token_ids
        with torch.inference_mode():
            theirs = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                                    pad_token_id=0)[0, len(prompt):].tolist()
            first = next((i for i, (a, b) in enumerate(zip(ours, theirs, strict=True)) if a != b), None)
            if first is None:
                continue
            logits = model(input_ids=torch.tensor([prompt + theirs[:first]])).logits[0, -1].float()
        top = torch.topk(logits, 2).values
        assert float(top[0] - top[1]) < BF16_NEAR_TIE, f"diverged at token {first} with a clear winner"

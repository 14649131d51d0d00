"""Prefill attention (engine.attention.prefill_attention_torch) against plain softmax attention."""

from __future__ import annotations

import pytest
import torch

from engine.attention import prefill_attention_torch


def _reference_attention(query, key, value, context_len: int, scale: float, window: int | None) -> torch.Tensor:
    """Plain softmax attention, one head at a time, positions spelled out: the oracle."""
    num_q, num_heads, _ = query.shape
    groups = num_heads // key.shape[1]
    q_pos = torch.arange(context_len - num_q, context_len)[:, None]
    k_pos = torch.arange(context_len)[None, :]
    allowed = (k_pos <= q_pos) & ((k_pos > q_pos - window) if window else True)
    out = torch.empty_like(query)
    for h in range(num_heads):
        scores = (query[:, h] @ key[:, h // groups].T) * scale
        out[:, h] = torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1) @ value[:, h // groups]
    return out


@pytest.mark.parametrize(("num_q", "context_len"), [(1, 1), (7, 7), (40, 40), (5, 37), (33, 100), (1, 64)])
@pytest.mark.parametrize(("num_kv_heads", "group"), [(4, 3), (2, 1)])
@pytest.mark.parametrize("window", [None, 9])
def test_prefill_attention_matches_plain_softmax(num_q: int, context_len: int, num_kv_heads: int, group: int,
                                                 window: int | None) -> None:
    """The split (cached part unmasked + chunk causal, merged by log-sum-exp) and the masked path."""
    gen = torch.Generator().manual_seed(num_q * 1000 + context_len)
    query = torch.randn(num_q, num_kv_heads * group, 32, generator=gen)
    key, value = (torch.randn(context_len, num_kv_heads, 32, generator=gen) for _ in range(2))
    got = prefill_attention_torch(query, key, value, context_len, 0.2, window)
    torch.testing.assert_close(got, _reference_attention(query, key, value, context_len, 0.2, window),
                               rtol=1e-5, atol=1e-5)

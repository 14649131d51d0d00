"""Decode attention split into length buckets: same output, less padded work."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.attention import decode_attention_bucketed, plan_decode_buckets


def _padded_work(lengths: list[int], buckets: list[tuple[int, int, int]], block_size: int) -> int:
    return sum((end - start) * -(-lengths[end - 1] // block_size) * block_size for start, end, _ in buckets)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 3000), max_size=80), st.sampled_from([8, 16, 32]), st.integers(0, 5000))
def test_buckets_cover_sorted_rows_in_order(lengths: list[int], block_size: int, cost: int) -> None:
    lengths = sorted(lengths)
    buckets = plan_decode_buckets(lengths, block_size, cost)
    assert [r for start, end, _ in buckets for r in range(start, end)] == list(range(len(lengths)))
    assert all(end > start and longest == lengths[end - 1] for start, end, longest in buckets)
    # never more padded work + bucket cost than a single bucket
    if lengths:
        single = _padded_work(lengths, [(0, len(lengths), lengths[-1])], block_size) + cost
        assert _padded_work(lengths, buckets, block_size) + cost * len(buckets) <= single


def test_spread_lengths_get_several_buckets_and_equal_lengths_one() -> None:
    spread = [20, 30, 40, 500, 520, 2000]
    assert len(plan_decode_buckets(spread, 16, 256)) == 3
    assert plan_decode_buckets([100] * 10, 16, 0) == [(0, 10, 100)]


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(1, 200), min_size=1, max_size=12), st.sampled_from([(4, 4), (8, 2), (6, 1)]),
       st.sampled_from([None, 7]))
def test_bucketed_equals_one_bucket(lengths: list[int], heads: tuple[int, int], window: int | None) -> None:
    torch.manual_seed(len(lengths))
    lengths = sorted(lengths)
    num_heads, kv_heads = heads
    block_size, dim = 8, 16
    per_seq = [-(-n // block_size) for n in lengths]
    k_cache = torch.randn(sum(per_seq) + 1, block_size, kv_heads, dim)
    v_cache = torch.randn_like(k_cache)
    tables = torch.zeros(len(lengths), max(per_seq), dtype=torch.long)
    # blocks handed out in reverse so tables are not the identity
    free = list(range(sum(per_seq), 0, -1))
    for i, nb in enumerate(per_seq):
        tables[i, :nb] = torch.tensor([free.pop() for _ in range(nb)])
    query = torch.randn(len(lengths), num_heads, dim)
    seq_lens = torch.tensor(lengths)
    one = decode_attention_bucketed(query, k_cache, v_cache, tables, seq_lens, 0.25, window, {}, None)
    buckets = plan_decode_buckets(lengths, block_size, 0)
    many = decode_attention_bucketed(query, k_cache, v_cache, tables, seq_lens, 0.25, window, {}, buckets)
    torch.testing.assert_close(many, one, rtol=1e-5, atol=1e-6)

"""Triton kernel: paged decode attention (one new query token per sequence).

Cache layout (per layer): k_cache, v_cache of shape
[num_blocks, block_size, num_kv_heads, head_dim], head_dim contiguous; logical
position p of sequence b lives in physical block block_tables[b, p // block_size]
at offset p % block_size. Drop-in for `engine.attention.decode_attention_torch`.

Work split: one program per (sequence, kv head). It loads the query rows of
every query head sharing that kv head (grouped-query attention), so each K/V
tile is read from memory once per group instead of once per query head, and the
group becomes the M dimension of a tensor-core dot. The context is walked in
tiles of TILE_N logical positions with an online (streaming) softmax in fp32,
so no score row is ever materialised. A tile may span several cache blocks
(block_size < TILE_N) or part of one: the physical block is looked up per
position, which keeps the kernel independent of block_size.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Logical positions per loop iteration: >= 16 (the P.V dot's K), small enough
# that a [TILE_N, head_dim] K and V tile stay cheap for head_dim up to 256.
# Not tuned on a GPU (none available); a candidate for autotuning.
TILE_N = 32
# Smallest M/N/K tl.dot compiles for on NVIDIA targets.
_MIN_DOT = 16
_LOG2E = 1.4426950408889634


@triton.jit
def _paged_decode_kernel(
    out_ptr,                       # [B, H, D] contiguous, query's dtype
    q_ptr,                         # [B, H, D], any strides
    k_cache_ptr, v_cache_ptr,      # [num_blocks, BLOCK_SIZE, Hkv, D], stride 1 along D
    block_tables_ptr,              # [B, max_blocks] int64, stride 1 along blocks
    seq_lens_ptr,                  # [B] int64, tokens incl. the new one (>= 1)
    qk_scale,                      # fp32: softmax scale * log2(e), scores live in the log2 domain
    window,                        # i32: sliding window in tokens (read only if SLIDING)
    stride_qb, stride_qh, stride_qd,
    stride_ob, stride_oh,
    stride_cb, stride_ct, stride_ch,  # cache strides (elements) of block, token, head
    stride_btb,
    QUERIES_PER_KV: tl.constexpr,  # H // Hkv
    HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    GROUP_PAD: tl.constexpr,       # >= max(QUERIES_PER_KV, 16), power of two: dot M
    HEAD_DIM_PAD: tl.constexpr,    # >= max(HEAD_DIM, 16), power of two: dot K (scores) and N (output)
    TILE: tl.constexpr,            # positions per iteration, power of two >= 16
    SLIDING: tl.constexpr,
    DOT_PRECISION: tl.constexpr,   # "ieee" keeps fp32 exact ("tf32" would round inputs to 10 bits)
):
    seq = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)

    rows = tl.arange(0, GROUP_PAD)
    heads = kv_head * QUERIES_PER_KV + rows
    row_mask = rows < QUERIES_PER_KV  # padding rows load zeros and are never stored
    dims = tl.arange(0, HEAD_DIM_PAD)
    dim_mask = dims < HEAD_DIM
    q = tl.load(q_ptr + seq * stride_qb + heads[:, None] * stride_qh + dims[None, :] * stride_qd,
                mask=row_mask[:, None] & dim_mask[None, :], other=0.0)

    seq_len = tl.load(seq_lens_ptr + seq).to(tl.int32)
    # Key p is visible iff first <= p < seq_len; with a window W, first = seq_len - W.
    if SLIDING:
        first = tl.maximum(seq_len - window, 0)
    else:
        first = seq_len * 0
    # Start on a TILE boundary; the positions before `first` in that tile are masked.
    start_tile = (first // TILE) * TILE

    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)  # running max (log2 domain)
    l_i = tl.zeros([GROUP_PAD], tl.float32)                # running sum of exp2(s - m_i)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM_PAD], tl.float32)  # running sum of p * v
    offs = tl.arange(0, TILE)
    table_row = block_tables_ptr + seq * stride_btb
    head_off = kv_head.to(tl.int64) * stride_ch

    # Every tile holds at least one visible key (first < seq_len, the loop stops at
    # seq_len), so m_i is finite after the first iteration and no row sums to 0.
    for tile_start in range(start_tile, seq_len, TILE):
        pos = tile_start + offs
        visible = (pos >= first) & (pos < seq_len)
        block = tl.load(table_row + pos // BLOCK_SIZE, mask=visible, other=0)  # int64 physical block
        token_off = block * stride_cb + (pos % BLOCK_SIZE) * stride_ct + head_off
        kv_mask = visible[:, None] & dim_mask[None, :]
        kv_off = token_off[:, None] + dims[None, :]

        k = tl.load(k_cache_ptr + kv_off, mask=kv_mask, other=0.0)  # [TILE, D]
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [GROUP_PAD, TILE] fp32
        s = tl.where(visible[None, :], s, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)  # rescales what was accumulated under the old max
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_cache_ptr + kv_off, mask=kv_mask, other=0.0)  # [TILE, D]
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    out = acc / l_i[:, None]
    tl.store(out_ptr + seq * stride_ob + heads[:, None] * stride_oh + dims[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & dim_mask[None, :])


def paged_decode_attention(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                           sliding_window: int | None = None) -> torch.Tensor:
    """Attention of one new token per sequence over its paged context.

    query [B, H, D] (any strides); k_cache/v_cache [num_blocks, block_size, Hkv, D]
    sharing one layout, D contiguous, same dtype as query; block_tables
    [B, max_blocks] int64 (padded); seq_lens [B] int64, tokens in the context
    including the new one, already written to the cache, each >= 1 and
    <= max_blocks * block_size. H must be a multiple of Hkv: query head h reads
    kv head h // (H // Hkv). With sliding_window W, key position p is attended
    iff p > seq_len - 1 - W. `scale` multiplies q.k before the softmax.
    Returns a new contiguous [B, H, D] tensor in query's dtype; accumulation is fp32.
    """
    batch, num_heads, head_dim = query.shape
    _, block_size, num_kv_heads, cache_dim = k_cache.shape
    if cache_dim != head_dim or num_heads % num_kv_heads != 0:
        raise ValueError(f"query {tuple(query.shape)} does not fit cache {tuple(k_cache.shape)}")
    if v_cache.shape != k_cache.shape or v_cache.stride() != k_cache.stride() or k_cache.stride(3) != 1:
        raise ValueError("k_cache and v_cache must share one layout with head_dim contiguous")
    if query.dtype != k_cache.dtype or v_cache.dtype != k_cache.dtype:
        raise ValueError(f"dtype mismatch: query {query.dtype}, caches {k_cache.dtype}/{v_cache.dtype}")
    if block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two, got {block_size}")
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be >= 1, got {sliding_window}")
    out = torch.empty((batch, num_heads, head_dim), dtype=query.dtype, device=query.device)
    if batch == 0:
        return out
    block_tables = block_tables if block_tables.stride(1) == 1 else block_tables.contiguous()
    seq_lens = seq_lens.contiguous()
    group = num_heads // num_kv_heads
    _paged_decode_kernel[(batch, num_kv_heads)](
        out, query, k_cache, v_cache, block_tables, seq_lens,
        float(scale) * _LOG2E,
        # A window past 2**31 tokens is no window; clamp so it fits the i32 argument.
        min(sliding_window, 2**31 - 1) if sliding_window is not None else 0,
        *query.stride(), out.stride(0), out.stride(1),
        *k_cache.stride()[:3], block_tables.stride(0),
        QUERIES_PER_KV=group, HEAD_DIM=head_dim, BLOCK_SIZE=block_size,
        GROUP_PAD=max(_MIN_DOT, triton.next_power_of_2(group)),
        HEAD_DIM_PAD=max(_MIN_DOT, triton.next_power_of_2(head_dim)),
        TILE=TILE_N, SLIDING=sliding_window is not None,
        DOT_PRECISION="ieee" if query.dtype == torch.float32 else "tf32",
        enable_fp_fusion=True,  # FMA: faster and no less accurate; explicit, Triton 3.9 warns otherwise
    )
    return out

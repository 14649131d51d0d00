"""Triton kernel: paged decode attention (one new query token per sequence), optionally split-K.

Cache layout (per layer): k_cache, v_cache of shape
[num_blocks, block_size, num_kv_heads, head_dim], head_dim contiguous; logical
position p of sequence b lives in physical block block_tables[b, p // block_size]
at offset p % block_size. Drop-in for `engine.attention.decode_attention_torch`.

Work split: one program per (sequence, kv head, partition). It loads the query
rows of every query head sharing that kv head (grouped-query attention), so
each K/V tile is read from memory once per group instead of once per query
head, and the group becomes the M dimension of a tensor-core dot. The context
is walked in tiles of TILE_N logical positions with an online (streaming)
softmax in fp32 (engine/kernels/paged_tile.py), so no score row is ever
materialised.

Split-K (flash-decoding): with one partition (the usual case) the program
normalises and writes the output itself. With P > 1 partitions each program
covers a contiguous run of partition_len positions (a multiple of TILE_N,
counted from the first visible key) and writes its unnormalised partial
(max m, sum l, acc; fp32, log2 domain) to a [B, H, P] workspace; a second
kernel merges the P partials of each (sequence, head) by rescaling with
exp2(m_p - max_p m_p). A partition past the end of a shorter sequence holds
no key and leaves (NEG_INIT, 0, 0), which the merge weighs by 0.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from engine.kernels.paged_tile import (
    LOG2E,
    NEG_INIT,
    attend_tile,
    check_paged_inputs,
    dot_in_fp32,
    dot_precision,
    padded,
    window_arg,
)

# Logical positions per loop iteration: >= 16 (the P.V dot's K), small enough
# that a [TILE_N, head_dim] K and V tile stay cheap for head_dim up to 256.
# Not tuned on a GPU (none available); a candidate for autotuning.
TILE_N = 32

# Split-K rule. A decode step launches B * Hkv programs; with few sequences and
# long contexts that leaves most of a Hopper's 132 SMs idle while each program
# walks the whole context. So: aim for SPLIT_TARGET_PROGRAMS (two per SM, so one
# slow program does not leave half the GPU idle at the tail), but keep every
# partition at least SPLIT_MIN_TOKENS long (shorter ones spend more on writing
# partials and merging than they gain) and at most SPLIT_MAX partitions:
#   splits = min(ceil(SPLIT_TARGET_PROGRAMS / (B * Hkv)), ceil(span / SPLIT_MIN_TOKENS), SPLIT_MAX)
# where span bounds the positions a sequence reads: the block table's width in
# tokens (known on the host, no device sync), or the window when that is shorter.
# These numbers are a reasoned starting point, not measured: no GPU was available.
SPLIT_TARGET_PROGRAMS = 2 * 132
SPLIT_MIN_TOKENS = 256
SPLIT_MAX = 32


@triton.jit
def _paged_decode_kernel(
    out_ptr,                       # [B, H, D] query's dtype (written when not SPLIT)
    part_m_ptr, part_l_ptr,        # [B, H, P] fp32 partial max / sum (written when SPLIT)
    part_acc_ptr,                  # [B, H, P, D] fp32 partial unnormalised output (written when SPLIT)
    q_ptr,                         # [B, H, D], any strides
    k_cache_ptr, v_cache_ptr,      # [num_blocks, BLOCK_SIZE, Hkv, D], stride 1 along D
    block_tables_ptr,              # [B, max_blocks] int64, stride 1 along blocks
    seq_lens_ptr,                  # [B] int64, tokens incl. the new one (>= 1)
    qk_scale,                      # fp32: softmax scale * log2(e), scores live in the log2 domain
    window,                        # i32: sliding window in tokens (read only if SLIDING)
    partition_len,                 # i32: positions per partition, a multiple of TILE (read only if SPLIT)
    stride_qb, stride_qh, stride_qd,
    stride_ob, stride_oh,
    stride_cb, stride_ct, stride_ch,  # cache strides (elements) of block, token, head
    stride_btb,
    QUERIES_PER_KV: tl.constexpr,  # H // Hkv
    NUM_HEADS: tl.constexpr,       # H
    HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    GROUP_PAD: tl.constexpr,       # >= max(QUERIES_PER_KV, 16), power of two: dot M
    HEAD_DIM_PAD: tl.constexpr,    # >= max(HEAD_DIM, 16), power of two: dot K (scores) and N (output)
    TILE: tl.constexpr,            # positions per iteration, power of two >= 16
    SLIDING: tl.constexpr,
    SPLIT: tl.constexpr,           # several partitions per sequence: write partials, not the output
    DOT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
):
    seq = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

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
    if SPLIT:
        lo = start_tile + split * partition_len
        hi = tl.minimum(seq_len, lo + partition_len)
    else:
        lo = start_tile
        hi = seq_len

    m_i = tl.full([GROUP_PAD], NEG_INIT, tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM_PAD], tl.float32)
    offs = tl.arange(0, TILE)
    table_row = block_tables_ptr + seq * stride_btb
    head_off = kv_head.to(tl.int64) * stride_ch

    # A partition that starts at or past seq_len runs no iteration and keeps (NEG_INIT, 0, 0).
    for tile_start in range(lo, hi, TILE):
        pos = tile_start + offs
        visible = (pos >= first) & (pos < hi)
        m_i, l_i, acc = attend_tile(q, m_i, l_i, acc, k_cache_ptr, v_cache_ptr, table_row, pos, visible,
                                    visible[None, :], head_off, dims, dim_mask, stride_cb, stride_ct, qk_scale,
                                    BLOCK_SIZE, DOT_PRECISION, DOT_FP32)

    store_mask = row_mask[:, None] & dim_mask[None, :]
    if SPLIT:
        # Partial index ((seq * H + head) * P + split): P = the grid's third dimension.
        part = (seq * NUM_HEADS + heads) * tl.num_programs(2) + split
        tl.store(part_m_ptr + part, m_i, mask=row_mask)
        tl.store(part_l_ptr + part, l_i, mask=row_mask)
        tl.store(part_acc_ptr + part[:, None] * HEAD_DIM + dims[None, :], acc, mask=store_mask)
    else:
        # Every visible sequence has its own token (first < seq_len), so l_i > 0 on real rows.
        out = acc / l_i[:, None]
        tl.store(out_ptr + seq * stride_ob + heads[:, None] * stride_oh + dims[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=store_mask)


@triton.jit
def _merge_partitions_kernel(
    out_ptr,                       # [B, H, D] query's dtype
    part_m_ptr, part_l_ptr,        # [B, H, P] fp32
    part_acc_ptr,                  # [B, H, P, D] fp32
    num_splits,                    # i32: P
    stride_ob, stride_oh,
    NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
    SPLITS_PAD: tl.constexpr,      # >= P, power of two
    HEAD_DIM_PAD: tl.constexpr,
):
    """One program per (sequence, query head): out = sum_p w_p acc_p / sum_p w_p l_p, w_p = exp2(m_p - max m)."""
    seq = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    splits = tl.arange(0, SPLITS_PAD)
    split_ok = splits < num_splits
    dims = tl.arange(0, HEAD_DIM_PAD)
    dim_mask = dims < HEAD_DIM
    part = (seq * NUM_HEADS + head) * num_splits + splits
    m = tl.load(part_m_ptr + part, mask=split_ok, other=float("-inf"))
    l_p = tl.load(part_l_ptr + part, mask=split_ok, other=0.0)
    acc = tl.load(part_acc_ptr + part[:, None] * HEAD_DIM + dims[None, :],
                  mask=split_ok[:, None] & dim_mask[None, :], other=0.0)
    # At least one partition holds the sequence's own token, so the max is a real score.
    w = tl.exp2(m - tl.max(m, 0))
    out = tl.sum(acc * w[:, None], 0) / tl.sum(l_p * w, 0)
    tl.store(out_ptr + seq * stride_ob + head * stride_oh + dims, out.to(out_ptr.dtype.element_ty), mask=dim_mask)


def decode_splits(batch: int, num_kv_heads: int, span: int) -> int:
    """Partitions per sequence by the split-K rule above; span bounds the positions any sequence reads."""
    want = math.ceil(SPLIT_TARGET_PROGRAMS / max(1, batch * num_kv_heads))
    return max(1, min(want, math.ceil(span / SPLIT_MIN_TOKENS), SPLIT_MAX))


def paged_decode_attention(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                           sliding_window: int | None = None, num_splits: int | None = None) -> torch.Tensor:
    """Attention of one new token per sequence over its paged context.

    query [B, H, D] (any strides); k_cache/v_cache [num_blocks, block_size, Hkv, D]
    sharing one layout, D contiguous, same dtype as query; block_tables
    [B, max_blocks] int64 (padded); seq_lens [B] int64, tokens in the context
    including the new one, already written to the cache, each >= 1 and
    <= max_blocks * block_size. H must be a multiple of Hkv: query head h reads
    kv head h // (H // Hkv). With sliding_window W, key position p is attended
    iff p > seq_len - 1 - W. `scale` multiplies q.k before the softmax.
    num_splits: partitions per sequence (split-K); None picks them by
    `decode_splits` from shapes alone (no device sync).
    Returns a new contiguous [B, H, D] tensor in query's dtype; accumulation is fp32.
    """
    check_paged_inputs(query, k_cache, v_cache, sliding_window)
    batch, num_heads, head_dim = query.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    out = torch.empty((batch, num_heads, head_dim), dtype=query.dtype, device=query.device)
    if batch == 0:
        return out
    block_tables = block_tables if block_tables.stride(1) == 1 else block_tables.contiguous()
    seq_lens = seq_lens.contiguous()
    span = block_tables.shape[1] * block_size
    if sliding_window is not None:
        span = min(span, sliding_window + TILE_N)  # + the part of the first tile before the window
    if num_splits is None:
        num_splits = decode_splits(batch, num_kv_heads, span)
    # Whole tiles per partition, and no partition that starts past every sequence.
    partition_len = math.ceil(math.ceil(span / num_splits) / TILE_N) * TILE_N
    num_splits = max(1, min(num_splits, math.ceil(span / partition_len)))
    split = num_splits > 1
    if split:
        part_m = torch.empty((batch, num_heads, num_splits), dtype=torch.float32, device=query.device)
        part_l = torch.empty_like(part_m)
        part_acc = torch.empty((batch, num_heads, num_splits, head_dim), dtype=torch.float32, device=query.device)
    else:
        part_m = part_l = part_acc = out  # not touched: SPLIT is off
    group = num_heads // num_kv_heads
    head_dim_pad = padded(head_dim)
    fp32_dot = dot_in_fp32(_paged_decode_kernel, query.dtype)
    _paged_decode_kernel[(batch, num_kv_heads, num_splits)](
        out, part_m, part_l, part_acc, query, k_cache, v_cache, block_tables, seq_lens,
        float(scale) * LOG2E, window_arg(sliding_window), partition_len,
        *query.stride(), out.stride(0), out.stride(1),
        *k_cache.stride()[:3], block_tables.stride(0),
        QUERIES_PER_KV=group, NUM_HEADS=num_heads, HEAD_DIM=head_dim, BLOCK_SIZE=block_size,
        GROUP_PAD=padded(group), HEAD_DIM_PAD=head_dim_pad,
        TILE=TILE_N, SLIDING=sliding_window is not None, SPLIT=split,
        DOT_PRECISION=dot_precision(query.dtype, fp32_dot), DOT_FP32=fp32_dot,
        enable_fp_fusion=True,  # FMA: faster and no less accurate; explicit, Triton 3.9 warns otherwise
    )
    if split:
        _merge_partitions_kernel[(batch, num_heads)](
            out, part_m, part_l, part_acc, num_splits, out.stride(0), out.stride(1),
            NUM_HEADS=num_heads, HEAD_DIM=head_dim, SPLITS_PAD=triton.next_power_of_2(num_splits),
            HEAD_DIM_PAD=head_dim_pad, enable_fp_fusion=True,
        )
    return out

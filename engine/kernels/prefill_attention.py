"""Triton kernel: causal prefill attention for packed prompt chunks, reading K/V from the paged cache.

Inputs: the query rows of P prefill sequences packed back to back (varlen):
sequence i owns rows [query_start[i], query_start[i + 1]) of query [T, H, D],
q_len_i = query_start[i + 1] - query_start[i] >= 1 tokens, which are the last
q_len_i of its seq_lens[i] context positions: row j sits at absolute position
seq_lens[i] - q_len_i + j and attends to keys [0, position] (with a sliding
window W, only to keys > position - W). Every key, the chunk's own included,
is read in place from the cache through block_tables[i] (store_kv has written
the chunk before attention runs), so a chunk after cached tokens (an earlier
chunk, a prefix-cache hit) costs no gather. Cache layout as in
engine/kernels/paged_tile.py. Drop-in for `engine.attention.prefill_attention_torch`
over `gather_context`, for all prefill sequences of a step in one launch.

Work split: grid (query tile, kv head). A query tile is TILE_Q consecutive
tokens of one sequence times the GROUP_PAD query heads sharing the kv head,
flattened to M = TILE_Q * GROUP_PAD rows (row r: token r // GROUP_PAD, head
r % GROUP_PAD). Loading the whole group makes each K/V tile serve every head
that reads it (one load per group instead of per head, as in the decode
kernel) and gives the dots an M of at least 64 even for one token of a
grouped model. Sequence i's tiles are numbered from query_start[i] // TILE_Q + i,
which leaves room for its ceil(q_len_i / TILE_Q) tiles before sequence i + 1's,
so T // TILE_Q + P programs along the first axis cover every tile without the
host reading lengths back from the device; a program finds its sequence by
binary search over query_start and exits when its tile is past the chunk.
Keys are walked in tiles of TILE_N up to the tile's last query position, with
the online softmax of paged_tile.attend_tile in fp32.
"""

from __future__ import annotations

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

# Rows (tokens x group heads) per query tile (a group wider than BLOCK_M takes
# one token per tile), and key positions per inner iteration. The usual flash
# attention shapes; they compile for sm_80/sm_90 up to head_dim 256
# (tests/test_kernels.py), but register use and speed are not measured or tuned:
# no GPU was available.
BLOCK_M = 64
TILE_N = 32


@triton.jit
def _paged_prefill_kernel(
    out_ptr,                       # [T, H, D], any strides
    q_ptr,                         # [T, H, D], any strides
    k_cache_ptr, v_cache_ptr,      # [num_blocks, BLOCK_SIZE, Hkv, D], stride 1 along D
    block_tables_ptr,              # [P, max_blocks] int64, stride 1 along blocks
    query_start_ptr,               # [P + 1] int, query_start[0] == 0, query_start[P] == T
    seq_lens_ptr,                  # [P] int, context length incl. the chunk
    num_seqs,                      # i32: P
    qk_scale,                      # fp32: softmax scale * log2(e), scores live in the log2 domain
    window,                        # i32: sliding window in tokens (read only if SLIDING)
    stride_qt, stride_qh, stride_qd,
    stride_ot, stride_oh, stride_od,
    stride_cb, stride_ct, stride_ch,  # cache strides (elements) of block, token, head
    stride_btb,
    QUERIES_PER_KV: tl.constexpr,  # H // Hkv
    HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    GROUP_PAD: tl.constexpr,       # >= QUERIES_PER_KV, power of two
    TILE_Q: tl.constexpr,          # tokens per query tile; TILE_Q * GROUP_PAD >= 16, power of two
    HEAD_DIM_PAD: tl.constexpr,    # >= max(HEAD_DIM, 16), power of two
    TILE: tl.constexpr,            # key positions per iteration, power of two >= 16
    SLIDING: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
):
    tile_id = tl.program_id(0)
    kv_head = tl.program_id(1)

    # The last sequence whose first tile number (query_start[i] // TILE_Q + i) is <= tile_id.
    # Both bounds start as i32 tensors: a loop-carried variable must keep one type.
    left = tile_id * 0
    right = left + num_seqs
    while left < right:
        mid = (left + right) // 2
        first_tile = tl.load(query_start_ptr + mid).to(tl.int32) // TILE_Q + mid
        if first_tile <= tile_id:
            left = mid + 1
        else:
            right = mid
    seq = left - 1
    q_begin = tl.load(query_start_ptr + seq).to(tl.int32)
    q_len = tl.load(query_start_ptr + seq + 1).to(tl.int32) - q_begin
    tile_q0 = (tile_id - (q_begin // TILE_Q + seq)) * TILE_Q  # first chunk token of this tile
    if tile_q0 >= q_len:  # a spare program: this sequence has fewer tiles than its slot holds
        return
    seq_len = tl.load(seq_lens_ptr + seq).to(tl.int32)
    chunk_pos0 = seq_len - q_len  # absolute position of the chunk's first token

    rows = tl.arange(0, TILE_Q * GROUP_PAD)
    tok = tile_q0 + rows // GROUP_PAD
    in_group = rows % GROUP_PAD
    row_ok = (tok < q_len) & (in_group < QUERIES_PER_KV)
    heads = kv_head * QUERIES_PER_KV + in_group
    q_pos = chunk_pos0 + tok
    dims = tl.arange(0, HEAD_DIM_PAD)
    dim_mask = dims < HEAD_DIM
    row_off = (q_begin + tok).to(tl.int64)
    q = tl.load(q_ptr + row_off[:, None] * stride_qt + heads[:, None] * stride_qh + dims[None, :] * stride_qd,
                mask=row_ok[:, None] & dim_mask[None, :], other=0.0)

    # Keys [first, kv_end) cover every row of the tile: up to its last token, from the
    # window start of its first token; each row then masks its own causal/window range.
    kv_end = chunk_pos0 + tl.minimum(tile_q0 + TILE_Q, q_len)
    if SLIDING:
        first = tl.maximum(chunk_pos0 + tile_q0 - window + 1, 0)
    else:
        first = kv_end * 0
    start_tile = (first // TILE) * TILE

    m_i = tl.full([TILE_Q * GROUP_PAD], NEG_INIT, tl.float32)
    l_i = tl.zeros([TILE_Q * GROUP_PAD], tl.float32)
    acc = tl.zeros([TILE_Q * GROUP_PAD, HEAD_DIM_PAD], tl.float32)
    offs = tl.arange(0, TILE)
    table_row = block_tables_ptr + seq.to(tl.int64) * stride_btb
    head_off = kv_head.to(tl.int64) * stride_ch

    for tile_start in range(start_tile, kv_end, TILE):
        pos = tile_start + offs
        key_ok = (pos >= first) & (pos < kv_end)
        score_ok = key_ok[None, :] & (pos[None, :] <= q_pos[:, None])
        if SLIDING:
            score_ok = score_ok & (pos[None, :] > q_pos[:, None] - window)
        m_i, l_i, acc = attend_tile(q, m_i, l_i, acc, k_cache_ptr, v_cache_ptr, table_row, pos, key_ok, score_ok,
                                    head_off, dims, dim_mask, stride_cb, stride_ct, qk_scale,
                                    BLOCK_SIZE, DOT_PRECISION, DOT_FP32)

    # A real row always sees its own key, so l_i > 0 there; padded rows are not stored.
    out = acc / tl.where(row_ok, l_i, 1.0)[:, None]
    tl.store(out_ptr + row_off[:, None] * stride_ot + heads[:, None] * stride_oh + dims[None, :] * stride_od,
             out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & dim_mask[None, :])


def paged_prefill_attention(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            block_tables: torch.Tensor, query_start: torch.Tensor, seq_lens: torch.Tensor,
                            scale: float, sliding_window: int | None = None,
                            out: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of P packed prompt chunks over their paged contexts, in one launch.

    query [T, H, D] (any strides), the chunks back to back; query_start [P + 1]
    int32/int64 on query's device, non-decreasing, query_start[0] == 0 and
    query_start[P] == T, each chunk >= 1 token; seq_lens [P] int (tokens of
    context including the chunk, all already in the cache); block_tables
    [P, max_blocks] int64 covering seq_lens; k_cache/v_cache
    [num_blocks, block_size, Hkv, D] in query's dtype, one layout, D contiguous,
    block_size a power of two. H must be a multiple of Hkv (head h reads kv head
    h // (H // Hkv)). `scale` multiplies q.k; with sliding_window W a query at
    position p attends keys in (p - W, p]. Writes into `out` ([T, H, D] in
    query's dtype, any strides, e.g. a row range of a larger output) when given,
    else into a new tensor; returns it. Accumulation is fp32 whatever the dtype.
    """
    check_paged_inputs(query, k_cache, v_cache, sliding_window)
    num_tokens, num_heads, head_dim = query.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    num_seqs = seq_lens.shape[0]
    if query_start.shape != (num_seqs + 1,) or block_tables.shape[0] != num_seqs:
        raise ValueError(f"{num_seqs} sequences need query_start [{num_seqs + 1}] and {num_seqs} table rows, got "
                         f"{tuple(query_start.shape)} and {tuple(block_tables.shape)}")
    if out is None:
        out = torch.empty((num_tokens, num_heads, head_dim), dtype=query.dtype, device=query.device)
    elif out.shape != query.shape or out.dtype != query.dtype:
        raise ValueError(f"out must be {tuple(query.shape)} {query.dtype}, got {tuple(out.shape)} {out.dtype}")
    if num_tokens == 0:
        return out
    block_tables = block_tables if block_tables.stride(1) == 1 else block_tables.contiguous()
    query_start, seq_lens = query_start.contiguous(), seq_lens.contiguous()
    group = num_heads // num_kv_heads
    group_pad = triton.next_power_of_2(group)
    tile_q = max(1, BLOCK_M // group_pad)
    fp32_dot = dot_in_fp32(_paged_prefill_kernel, query.dtype)
    _paged_prefill_kernel[(num_tokens // tile_q + num_seqs, num_kv_heads)](
        out, query, k_cache, v_cache, block_tables, query_start, seq_lens, num_seqs,
        float(scale) * LOG2E, window_arg(sliding_window),
        *query.stride(), *out.stride(),
        *k_cache.stride()[:3], block_tables.stride(0),
        QUERIES_PER_KV=group, HEAD_DIM=head_dim, BLOCK_SIZE=block_size,
        GROUP_PAD=group_pad, TILE_Q=tile_q, HEAD_DIM_PAD=padded(head_dim),
        TILE=TILE_N, SLIDING=sliding_window is not None,
        DOT_PRECISION=dot_precision(query.dtype, fp32_dot), DOT_FP32=fp32_dot,
        enable_fp_fusion=True,  # FMA: faster and no less accurate; explicit, Triton 3.9 warns otherwise
    )
    return out

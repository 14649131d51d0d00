"""Shared by the paged attention kernels: one online-softmax step over a K/V tile read through the block table.

Cache layout (per layer): k_cache, v_cache of shape
[num_blocks, block_size, num_kv_heads, head_dim], head_dim contiguous; logical
position p of a sequence lives in physical block table_row[p // block_size] at
offset p % block_size. The physical block is looked up per position, so a tile
may span several cache blocks or part of one and the kernels do not depend on
block_size.

Softmax state per query row, all fp32, scores in the log2 domain (the caller
folds log2(e) into qk_scale so exp2 replaces exp):
  m: running max of the scores seen (starts at NEG_INIT, not -inf: a row whose
     keys in a tile are all masked then gives exp2(-inf - NEG_INIT) = 0 and
     alpha = 1 instead of exp2(-inf + inf) = NaN);
  l: running sum of exp2(score - m);
  acc: running sum of exp2(score - m) * v.
The caller divides acc by l at the end (or stores the triple for a split-K reduce).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Start value of the running max: finite so that fully masked tiles never make NaNs,
# far below any real score (|q.k * scale| is many orders of magnitude smaller).
# A tl.constexpr because @triton.jit code may read no other kind of global.
NEG_INIT = tl.constexpr(-1.0e30)
# Smallest M/N/K tl.dot compiles for on NVIDIA targets.
MIN_DOT = 16
LOG2E = 1.4426950408889634


@triton.jit
def attend_tile(
    q,                             # [M, HEAD_DIM_PAD] query rows (padded rows and dims are 0)
    m_i, l_i, acc,                 # softmax state: [M], [M], [M, HEAD_DIM_PAD] fp32
    k_cache_ptr, v_cache_ptr,
    table_row,                     # pointer to this sequence's block table row (int64 blocks)
    pos,                           # [TILE] logical key positions of this tile
    key_ok,                        # [TILE] positions to load at all (inside the sequence)
    score_ok,                      # [M, TILE] or [1, TILE]: which (row, key) pairs are attended
    head_off,                      # int64 offset of the kv head (kv_head * stride_ch)
    dims, dim_mask,                # [HEAD_DIM_PAD] and dims < HEAD_DIM
    stride_cb, stride_ct,          # cache strides (elements) of block and token
    qk_scale,                      # softmax scale * log2(e)
    BLOCK_SIZE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,   # "ieee" keeps fp32 exact ("tf32" would round inputs to 10 bits)
    DOT_FP32: tl.constexpr,        # cast dot operands to fp32 first (see `dot_in_fp32`)
):
    """Fold one tile of keys into (m_i, l_i, acc); returns the new triple."""
    block = tl.load(table_row + pos // BLOCK_SIZE, mask=key_ok, other=0)  # int64 physical block
    token_off = block * stride_cb + (pos % BLOCK_SIZE) * stride_ct + head_off
    kv_mask = key_ok[:, None] & dim_mask[None, :]
    kv_off = token_off[:, None] + dims[None, :]

    k = tl.load(k_cache_ptr + kv_off, mask=kv_mask, other=0.0)  # [TILE, D]
    if DOT_FP32:
        q = q.to(tl.float32)
        k = k.to(tl.float32)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [M, TILE] fp32
    s = tl.where(score_ok, s, float("-inf"))

    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)  # rescales what was accumulated under the old max
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(v_cache_ptr + kv_off, mask=kv_mask, other=0.0)  # [TILE, D]
    # Probabilities are rounded to the cache dtype before the P.V dot, as on tensor cores.
    p = p.to(v.dtype)
    if DOT_FP32:
        p = p.to(tl.float32)
        v = v.to(tl.float32)
    acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=DOT_PRECISION)
    return m_new, l_i, acc


def check_paged_inputs(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                       sliding_window: int | None) -> None:
    """The checks every paged attention wrapper makes: query [T, H, D] against the cache layout."""
    _, num_heads, head_dim = query.shape
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


def window_arg(sliding_window: int | None) -> int:
    """The kernels' i32 window argument: a window past 2**31 tokens is no window, so clamp it."""
    return min(sliding_window, 2**31 - 1) if sliding_window is not None else 0


def dot_in_fp32(kernel: object, dtype: torch.dtype) -> bool:
    """Whether `kernel` must cast bf16 dot operands to fp32: only when Triton's interpreter runs it.

    The interpreter keeps bf16 tensors as their uint16 bit patterns and its tl.dot
    multiplies those as integers (Triton 3.9), so bf16 dots there return garbage.
    bf16 values are exact in fp32 and a bf16 tensor-core dot accumulates exact
    products in fp32, so the fp32 dot computes the same thing up to summation order.
    On a GPU the kernel is a JITFunction and the dots stay bf16.
    """
    return dtype == torch.bfloat16 and not isinstance(kernel, triton.runtime.JITFunction)


def dot_precision(dtype: torch.dtype, fp32_operands: bool = False) -> str:
    """fp32 dots in full precision, so results match torch; 16-bit inputs are exact in any mode."""
    return "ieee" if dtype == torch.float32 or fp32_operands else "tf32"


def padded(n: int) -> int:
    """n rounded up to a power of two of at least MIN_DOT: a tl.arange length that tl.dot accepts."""
    return max(MIN_DOT, triton.next_power_of_2(n))

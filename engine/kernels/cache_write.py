"""Triton kernel: scatter this step's key/value rows into the paged KV cache.

Cache layout (per layer): k_cache, v_cache of shape
[num_blocks, block_size, num_kv_heads, head_dim], head_dim contiguous. Token t
goes to slot s = slot_mapping[t] = block * block_size + offset; s < 0 means
"padding, do not write". Drop-in for `engine.attention.store_kv_torch`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _store_kv_kernel(
    key_ptr, value_ptr,            # [T, Hkv, D], any strides
    k_cache_ptr, v_cache_ptr,      # [num_blocks, BLOCK_SIZE, Hkv, D], stride 1 along D
    slot_ptr,                      # [T] int64; < 0 = skip
    stride_kt, stride_kh, stride_kd,
    stride_vt, stride_vh, stride_vd,
    stride_cb, stride_ct, stride_ch,  # cache strides (elements) of block, token, head
    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    HEADS_PAD: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,  # next powers of two (tl.arange needs them)
):
    """One program per token: copies its whole [Hkv, D] tile of K and of V."""
    tok = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + tok).to(tl.int64)
    heads = tl.arange(0, HEADS_PAD)
    dims = tl.arange(0, HEAD_DIM_PAD)
    # Padding tokens (slot < 0) mask every load and store off instead of branching.
    # The compare is made on a block, not the scalar: the 3.9 interpreter turns a
    # broadcast scalar bool into int32 and then rejects it as a load mask.
    head_ok = (heads < NUM_KV_HEADS) & ((heads * 0 + slot) >= 0)
    mask = head_ok[:, None] & (dims[None, :] < HEAD_DIM)
    # Slot arithmetic in int64: a large cache exceeds 2**31 elements.
    block = slot // BLOCK_SIZE
    offset = slot % BLOCK_SIZE
    dst = block * stride_cb + offset * stride_ct + heads[:, None] * stride_ch + dims[None, :]

    k = tl.load(key_ptr + tok * stride_kt + heads[:, None] * stride_kh + dims[None, :] * stride_kd, mask=mask)
    tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    v = tl.load(value_ptr + tok * stride_vt + heads[:, None] * stride_vh + dims[None, :] * stride_vd, mask=mask)
    tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def store_kv(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Write key/value [T, Hkv, D] into k_cache/v_cache in place at slot_mapping [T] (int64).

    key/value may be non-contiguous views (strides are passed through). Slots < 0
    are skipped; valid slots must be < num_blocks * block_size and distinct (two
    tokens writing one slot race, as with index_copy_).
    """
    num_tokens, num_kv_heads, head_dim = key.shape
    _, block_size, cache_heads, cache_dim = k_cache.shape
    if value.shape != key.shape or (cache_heads, cache_dim) != (num_kv_heads, head_dim):
        raise ValueError(f"shape mismatch: key {tuple(key.shape)}, value {tuple(value.shape)}, "
                         f"cache {tuple(k_cache.shape)}")
    if v_cache.shape != k_cache.shape or v_cache.stride() != k_cache.stride() or k_cache.stride(3) != 1:
        raise ValueError("k_cache and v_cache must share one layout with head_dim contiguous")
    if slot_mapping.shape != (num_tokens,):
        raise ValueError(f"slot_mapping must be [{num_tokens}], got {tuple(slot_mapping.shape)}")
    if num_tokens == 0:
        return
    slot_mapping = slot_mapping.contiguous()  # read with stride 1; a no-op for the usual fresh tensor
    _store_kv_kernel[(num_tokens,)](
        key, value, k_cache, v_cache, slot_mapping,
        *key.stride(), *value.stride(), *k_cache.stride()[:3],
        NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, BLOCK_SIZE=block_size,
        HEADS_PAD=triton.next_power_of_2(num_kv_heads), HEAD_DIM_PAD=triton.next_power_of_2(head_dim),
        enable_fp_fusion=True,  # explicit: Triton 3.9 warns when the default is relied on
    )

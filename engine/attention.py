"""Paged attention over a packed (ragged) batch.

Cache layout (per layer): k_cache, v_cache of shape
[num_blocks, block_size, num_kv_heads, head_dim]; token slot s lives at
block s // block_size, offset s % block_size. A slot of -1 means "do not
write" (padding).

A packed batch puts every scheduled token of every sequence in one row. For
sequence i, `query_lens[i]` new tokens are appended to a context that ends at
`seq_lens[i]` tokens (cached + new); new token j of it sits at absolute
position seq_lens[i] - query_lens[i] + j and attends to keys [0, position]
(and, with a sliding window W, only to keys > position - W).

Sequences with one new token (decodes) come sorted by context length and
are split into a few length buckets (`plan_decode_buckets`); each bucket goes
through one batched padded gather + SDPA, so short contexts are not padded to
the longest one. Sequences with several new tokens (prefill chunks) are
handled one by one, because a step holds few of them and each is large
enough to keep SDPA busy.

Backends for decodes: "torch" (the bucketed gather + SDPA above), "cpu" (a C
kernel reading blocks in place, engine/cpu_attention.py), "triton" (CUDA,
engine/kernels). Prefill chunks take the torch path one by one, except with
"triton": there all chunks of the step go through one launch of a kernel that
reads every key from the cache in place (engine/kernels/prefill_attention.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

# [start, end) decode rows and the longest context among them (tokens), known on the host so that
# sizing a bucket's gather needs no device-to-host sync.
DecodeBucket = tuple[int, int, int]

# Fixed cost of one extra decode bucket (a gather + an SDPA call), in tokens of
# padded context it is worth: measured with bench/decode_buckets.py on the
# small model (see BENCHMARKS.md).
DECODE_BUCKET_COST_TOKENS = 256


@dataclass
class ForwardContext:
    """Everything attention needs for one packed forward pass.

    Invariants: len(query_lens) == len(seq_lens) == len(block_tables) == number
    of sequences; sum(query_lens) == number of packed tokens == len(slot_mapping);
    decode sequences (query_len == 1) come first in the packed row, so their
    tokens are rows [0, num_decodes).
    """

    kv_caches: list[tuple[torch.Tensor, torch.Tensor]]  # per layer (k_cache, v_cache)
    slot_mapping: torch.Tensor  # [T] int64
    query_lens: list[int]
    seq_lens: list[int]
    block_tables: torch.Tensor  # [B, max_blocks] int64, padded with 0
    num_decodes: int
    decode_seq_lens: torch.Tensor  # [num_decodes] int64
    decode_buckets: list[DecodeBucket] | None = None  # None: one bucket
    backend: str = "torch"
    workspace: dict = field(default_factory=dict)  # reused gather buffers, keyed by shape
    # Prefill rows for the triton backend, P = len(query_lens) - num_decodes. prefill_query_start
    # [P + 1] int32: prefill sequence i (sequence num_decodes + i) owns packed rows
    # [num_decodes + prefill_query_start[i], num_decodes + prefill_query_start[i + 1]); it starts at 0
    # and ends at sum(query_lens[num_decodes:]). prefill_seq_lens [P] int64 == seq_lens[num_decodes:].
    # Both on the device of the packed tensors; None: paged_attention builds them there on first use.
    prefill_query_start: torch.Tensor | None = None
    prefill_seq_lens: torch.Tensor | None = None


def store_kv_torch(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   slot_mapping: torch.Tensor) -> None:
    """Write key/value [T, Hkv, D] into the cache at slot_mapping [T] (slots < 0 skipped on the CPU).

    Off the CPU no slot may be < 0: finding them costs a device-to-host sync per layer, and only padded
    batches have them, which the Triton store (engine/kernels) handles.
    """
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    if slot_mapping.device.type == "cpu" and not bool((valid := slot_mapping >= 0).all()):
        key, value, slot_mapping = key[valid], value[valid], slot_mapping[valid]
    k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, key)
    v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, value)


def decode_attention_torch(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                           sliding_window: int | None = None,
                           workspace: dict | None = None, max_len: int | None = None) -> torch.Tensor:
    """One new token per sequence attending to its whole paged context.

    query [B, H, D]; block_tables [B, max_blocks] int64; seq_lens [B] (tokens,
    the new one included, already written to the cache); max_len: max(seq_lens) when the caller knows it
    on the host (else read from the tensor, a sync on a GPU). Returns [B, H, D].
    One padded gather through the block table into a reused buffer, then SDPA
    with a padding mask: the fastest CPU shape measured on the 2-core development machine.
    """
    batch, num_heads, head_dim = query.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    max_len = int(seq_lens.max()) if max_len is None else max_len
    num_blocks = (max_len + block_size - 1) // block_size
    table = block_tables[:, :num_blocks].reshape(-1)
    k = _gather(k_cache, table, workspace, "k").view(batch, num_blocks * block_size, num_kv_heads, head_dim)
    v = _gather(v_cache, table, workspace, "v").view(batch, num_blocks * block_size, num_kv_heads, head_dim)
    positions = torch.arange(num_blocks * block_size, device=query.device)
    mask = positions[None, :] < seq_lens[:, None]
    if sliding_window is not None:
        mask &= positions[None, :] > (seq_lens[:, None] - 1 - sliding_window)
    out = F.scaled_dot_product_attention(
        query.unsqueeze(2), k.transpose(1, 2), v.transpose(1, 2),
        attn_mask=mask[:, None, None, :], scale=scale, enable_gqa=num_heads != num_kv_heads,
    )
    return out.squeeze(2)


def decode_attention_bucketed(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                              block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                              sliding_window: int | None, workspace: dict | None,
                              buckets: list[DecodeBucket] | None) -> torch.Tensor:
    """decode_attention_torch per row range of `buckets` (all rows when None)."""
    if not buckets:
        return decode_attention_torch(query, k_cache, v_cache, block_tables, seq_lens, scale,
                                      sliding_window, workspace)
    if len(buckets) == 1:
        return decode_attention_torch(query, k_cache, v_cache, block_tables, seq_lens, scale,
                                      sliding_window, workspace, buckets[0][2])
    out = torch.empty_like(query)
    for start, end, max_len in buckets:
        out[start:end] = decode_attention_torch(query[start:end], k_cache, v_cache, block_tables[start:end],
                                                seq_lens[start:end], scale, sliding_window, workspace, max_len)
    return out


def plan_decode_buckets(sorted_lens: list[int], block_size: int,
                        bucket_cost_tokens: int = DECODE_BUCKET_COST_TOKENS) -> list[DecodeBucket]:
    """Split decodes, sorted by context length ascending, into (start, end, longest length) buckets.

    Minimises sum over buckets of (rows x padded length of its longest row, in
    tokens) + bucket_cost_tokens per bucket (the fixed cost of one gather +
    SDPA call expressed in tokens of work), by dynamic programming over the
    sorted lengths: O(B^2) per step, not per layer. Invariants: buckets are
    contiguous, cover [0, len(sorted_lens)) in order, and none is empty.
    """
    # Cuts only fall between different padded lengths: group equal ones first.
    groups: list[tuple[int, int]] = []  # (padded length, rows ending here)
    for row, length in enumerate(sorted_lens):
        padded = -(-length // block_size) * block_size
        if groups and groups[-1][0] == padded:
            groups[-1] = (padded, row + 1)
        else:
            groups.append((padded, row + 1))
    ends = [0] + [end for _, end in groups]
    best = [0] * len(ends)  # best[g]: cost of rows [0, ends[g])
    cut = [0] * len(ends)
    for g in range(1, len(ends)):
        longest = groups[g - 1][0]
        best[g], cut[g] = min((best[s] + (ends[g] - ends[s]) * longest + bucket_cost_tokens, s) for s in range(g))
    buckets: list[DecodeBucket] = []
    g = len(ends) - 1
    while g > 0:
        buckets.append((ends[cut[g]], ends[g], sorted_lens[ends[g] - 1]))
        g = cut[g]
    return buckets[::-1]


def prefill_attention_torch(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            context_len: int, scale: float, sliding_window: int | None = None) -> torch.Tensor:
    """Causal attention of query [Tq, H, D] over key/value [Tk, Hkv, D], Tk = context_len.

    The queries are the last Tq positions of the context (a prompt chunk after
    cached or earlier-chunk tokens). Returns [Tq, H, D].

    Query heads are grouped under their KV head ([Hkv, G, Tq, D]) and K/V are
    broadcast over the group with stride 0, so GQA costs no copy. A chunk after
    cached tokens is two flash calls, the cached part unmasked and the chunk
    causal, merged by their log-sum-exps: an explicit [Tq, Tk] mask sends SDPA
    down a path ~2x slower on the CPU (bench numbers in BENCHMARKS.md).
    """
    num_q, num_heads, head_dim = query.shape
    num_kv_heads = key.shape[1]
    if sliding_window is not None or _FLASH_WITH_LSE is None or query.device.type != "cpu":
        return _prefill_attention_masked(query, key, value, context_len, scale, sliding_window)
    groups = num_heads // num_kv_heads
    q = query.reshape(num_q, num_kv_heads, groups, head_dim).permute(1, 2, 0, 3)  # [Hkv, G, Tq, D]
    k, v = key.transpose(0, 1)[:, None], value.transpose(0, 1)[:, None]  # [Hkv, 1, Tk, D]
    cached = context_len - num_q

    def flash(start: int, end: int, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (num_kv_heads, groups, end - start, head_dim)
        out, lse = _FLASH_WITH_LSE(q, k[:, :, start:end].expand(shape), v[:, :, start:end].expand(shape),
                                   0.0, causal, scale=scale)[:2]
        return out, lse  # the op also returns workspace tensors the merge does not need

    out, lse = flash(cached, context_len, True)
    if cached:
        out_cached, lse_cached = flash(0, cached, False)
        top = torch.maximum(lse, lse_cached)
        w_new, w_cached = torch.exp(lse - top).unsqueeze(-1), torch.exp(lse_cached - top).unsqueeze(-1)
        out = (out * w_new + out_cached * w_cached) / (w_new + w_cached)
    return out.permute(2, 0, 1, 3).reshape(num_q, num_heads, head_dim)


def _prefill_attention_masked(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, context_len: int,
                              scale: float, sliding_window: int | None) -> torch.Tensor:
    """prefill_attention_torch with an explicit mask: sliding windows, devices other than the CPU (the
    merged flash path uses a CPU-only op), and torch builds without that op."""
    num_q, num_heads, _ = query.shape
    groups = num_heads // key.shape[1]
    if groups > 1:  # torch's CPU flash kernel takes neither GQA nor 3-D inputs: expand, add a batch dim
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    use_causal_flag = num_q == context_len and sliding_window is None
    mask = None
    if not use_causal_flag:
        q_pos = torch.arange(context_len - num_q, context_len, device=query.device)[:, None]
        k_pos = torch.arange(context_len, device=query.device)[None, :]
        mask = k_pos <= q_pos
        if sliding_window is not None:
            mask &= k_pos > q_pos - sliding_window
    out = F.scaled_dot_product_attention(
        query.transpose(0, 1)[None], key.transpose(0, 1)[None], value.transpose(0, 1)[None],
        attn_mask=mask, is_causal=use_causal_flag, scale=scale,
    )[0]
    return out.transpose(0, 1)


# torch's CPU flash attention, which also returns the log-sum-exp per query row (SDPA's public API
# does not); (query, key, value, dropout_p, is_causal, *, attn_mask=None, scale=None) -> (out, lse).
_FLASH_WITH_LSE = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def gather_context(cache: torch.Tensor, block_table: torch.Tensor, context_len: int) -> torch.Tensor:
    """The first context_len tokens of one sequence from a paged cache: [context_len, Hkv, D]."""
    block_size = cache.shape[1]
    num_blocks = (context_len + block_size - 1) // block_size
    return cache[block_table[:num_blocks]].flatten(0, 1)[:context_len]


def paged_attention(ctx: ForwardContext, layer_idx: int, query: torch.Tensor, key: torch.Tensor,
                    value: torch.Tensor, scale: float, sliding_window: int | None) -> torch.Tensor:
    """Write this step's K/V into the cache, then attend. query [T, H, D], key/value [T, Hkv, D]."""
    k_cache, v_cache = ctx.kv_caches[layer_idx]
    ops = _backend_ops(ctx.backend)
    ops.store_kv(key, value, k_cache, v_cache, ctx.slot_mapping)
    out = torch.empty_like(query)
    nd = ctx.num_decodes
    if nd:
        out[:nd] = ops.decode(query[:nd], k_cache, v_cache, ctx.block_tables[:nd], ctx.decode_seq_lens,
                              scale, sliding_window, ctx.workspace, ctx.decode_buckets)
    if ops.prefill is not None and len(ctx.query_lens) > nd:  # every chunk in one launch, keys read in place
        query_start, seq_lens = _prefill_offsets(ctx, query.device)
        ops.prefill(query[nd:], k_cache, v_cache, ctx.block_tables[nd:], query_start, seq_lens, scale,
                    sliding_window, out=out[nd:])
        return out
    start = nd
    for i in range(nd, len(ctx.query_lens)):
        q_len, ctx_len = ctx.query_lens[i], ctx.seq_lens[i]
        end = start + q_len
        if q_len == ctx_len:  # nothing cached before this chunk: use the fresh K/V, no gather
            k, v = key[start:end], value[start:end]
        else:
            k = gather_context(k_cache, ctx.block_tables[i], ctx_len)
            v = gather_context(v_cache, ctx.block_tables[i], ctx_len)
        out[start:end] = prefill_attention_torch(query[start:end], k, v, ctx_len, scale, sliding_window)
        start = end
    return out


def _prefill_offsets(ctx: ForwardContext, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """ctx.prefill_query_start and ctx.prefill_seq_lens, built from the lists once per step if unset."""
    if ctx.prefill_query_start is None or ctx.prefill_seq_lens is None:
        lens = ctx.query_lens[ctx.num_decodes:]
        starts = [0]
        for n in lens:
            starts.append(starts[-1] + n)
        ctx.prefill_query_start = torch.tensor(starts, dtype=torch.int32, device=device)
        ctx.prefill_seq_lens = torch.tensor(ctx.seq_lens[ctx.num_decodes:], dtype=torch.int64, device=device)
    return ctx.prefill_query_start, ctx.prefill_seq_lens


@dataclass(frozen=True)
class _Ops:
    store_kv: object
    decode: object
    prefill: object = None  # all prefill chunks in one call; None: prefill_attention_torch per sequence


def _backend_ops(backend: str) -> _Ops:
    if backend == "cpu":
        from engine.cpu_attention import paged_decode_attention

        def decode_cpu(q, kc, vc, bt, sl, scale, window, _ws, _buckets):  # reads blocks in place: no buckets
            return paged_decode_attention(q, kc, vc, bt, sl, scale, window)

        return _Ops(store_kv=store_kv_torch, decode=decode_cpu)
    if backend == "triton":
        from engine.kernels import paged_decode_attention, paged_prefill_attention, store_kv

        def decode(q, kc, vc, bt, sl, scale, window, _ws, _buckets):  # one launch; no padding to bucket
            return paged_decode_attention(q, kc, vc, bt, sl, scale, window)

        return _Ops(store_kv=store_kv, decode=decode, prefill=paged_prefill_attention)
    return _TORCH_OPS


_TORCH_OPS = _Ops(store_kv=store_kv_torch, decode=decode_attention_bucketed)


def _gather(cache: torch.Tensor, index: torch.Tensor, workspace: dict | None, name: str) -> torch.Tensor:
    """cache[index] into a buffer reused across layers and steps (fresh allocations cost ~4x)."""
    shape = (index.numel(), *cache.shape[1:])
    if workspace is None:
        return cache.index_select(0, index)
    key = (name, cache.dtype)
    buf = workspace.get(key)
    numel = shape[0] * shape[1] * shape[2] * shape[3]
    if buf is None or buf.numel() < numel:
        buf = torch.empty(numel, dtype=cache.dtype, device=cache.device)
        workspace[key] = buf
    out = buf[:numel].view(shape)
    torch.index_select(cache, 0, index, out=out)
    return out

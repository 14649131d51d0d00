"""Triton kernels (engine.kernels) against the torch reference path (engine.attention).

Without CUDA the kernels run in Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 before triton is imported). The interpreter is 100-2000x
slower than a GPU, so shapes stay tiny; it also accepts code a GPU compile
rejects, so a second group of tests compiles every kernel to cubin for sm_90
and sm_80 (no GPU needed) in a subprocess.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from engine.attention import ForwardContext, decode_attention_torch, paged_attention, store_kv_torch
from engine.kernels import paged_attention as kernel_module
from engine.kernels import paged_decode_attention, store_kv
from engine.kernels.paged_attention import SPLIT_MAX, TILE_N, decode_splits
from tests.engine_helpers import random_paged_batch

REPO_ROOT = Path(__file__).resolve().parents[1]
NUM_KV_HEADS = 2
HEAD_DIM = 16  # the smallest head_dim a tl.dot compiles for without padding


def _paged_batch(seq_lens: list[int], block_size: int, group: int, head_dim: int = HEAD_DIM,
                 dtype: torch.dtype = torch.float32, seed: int = 0):
    return random_paged_batch(seq_lens, block_size, NUM_KV_HEADS, group, head_dim, dtype, seed)


def _lens_for(block_size: int) -> list[int]:
    # 1 token, exactly one and several blocks, non-multiples, and > 2 kernel tiles.
    return [1, block_size, 3 * block_size, 2 * block_size + 3, 2 * TILE_N + 5, block_size - 1]


# --- paged_decode_attention ----------------------------------------------------------------------

@pytest.mark.parametrize("window", [None, 11])
@pytest.mark.parametrize("group", [1, 2, 4, 8])
@pytest.mark.parametrize("block_size", [8, 16, 32])
def test_decode_matches_torch(block_size: int, group: int, window: int | None) -> None:
    seq_lens = _lens_for(block_size)
    q, kc, vc, table, lens = _paged_batch(seq_lens, block_size, group, seed=block_size * 10 + group)
    scale = HEAD_DIM ** -0.5
    got = paged_decode_attention(q, kc, vc, table, lens, scale, window)
    want = decode_attention_torch(q, kc, vc, table, lens, scale, window)
    assert got.shape == want.shape and got.dtype == q.dtype
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("window", [1, 2, 33, 69, 10_000])
def test_decode_window_edges(window: int) -> None:
    # 1: only the new token; 33: first visible key just past a tile boundary;
    # 69: the longest sequence exactly fills its window; 10_000: wider than any context.
    seq_lens = [1, 2, 32, 33, 64, 69]
    q, kc, vc, table, lens = _paged_batch(seq_lens, 16, group=2, seed=window)
    got = paged_decode_attention(q, kc, vc, table, lens, 0.3, window)
    want = decode_attention_torch(q, kc, vc, table, lens, 0.3, window)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("head_dim", [8, 24, 32])
def test_decode_padded_head_dim(head_dim: int) -> None:
    # 8 and 24 are padded inside the kernel (to 16 and 32); 32 needs no padding.
    q, kc, vc, table, lens = _paged_batch([5, 17, 40], 8, group=4, head_dim=head_dim, seed=head_dim)
    got = paged_decode_attention(q, kc, vc, table, lens, head_dim ** -0.5)
    want = decode_attention_torch(q, kc, vc, table, lens, head_dim ** -0.5)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_decode_strided_query_and_large_block() -> None:
    # A block (64) larger than the kernel tile, and a query that is a transposed view.
    seq_lens = [1, 64, 100, 130]
    _, kc, vc, table, lens = _paged_batch(seq_lens, 64, group=4, seed=7)
    q = torch.randn(NUM_KV_HEADS * 4, len(seq_lens), HEAD_DIM).transpose(0, 1)
    assert not q.is_contiguous()
    got = paged_decode_attention(q, kc, vc, table, lens, 0.25, 50)
    want = decode_attention_torch(q, kc, vc, table, lens, 0.25, 50)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# bf16 keeps 8 significant bits to fp16's 11: output rounding and probabilities rounded before the
# P.V dot cost up to ~2**-9 relative each (see BF16_TOL in tests/test_prefill_kernel.py).
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float16, 2e-3), (torch.bfloat16, 2e-2)])
def test_decode_16_bit(dtype: torch.dtype, tol: float) -> None:
    q, kc, vc, table, lens = _paged_batch([3, 16, 45], 16, group=2, dtype=dtype, seed=3)
    got = paged_decode_attention(q, kc, vc, table, lens, 0.25)
    want = decode_attention_torch(q.float(), kc.float(), vc.float(), table, lens, 0.25)
    assert got.dtype == dtype
    # Probabilities are rounded to the 16-bit dtype before the P.V dot, as on tensor cores.
    torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol)


def test_decode_empty_batch() -> None:
    _, kc, vc, _, _ = _paged_batch([4], 8, group=1)
    q = torch.empty(0, NUM_KV_HEADS, HEAD_DIM)
    out = paged_decode_attention(q, kc, vc, torch.zeros(0, 1, dtype=torch.int64),
                                 torch.zeros(0, dtype=torch.int64), 1.0)
    assert out.shape == (0, NUM_KV_HEADS, HEAD_DIM)


class _GridSpy:
    """Stands in for a Triton kernel in its module and records the grid of every launch."""

    def __init__(self, kernel) -> None:
        self.kernel, self.grids = kernel, []

    def __getitem__(self, grid):
        self.grids.append(grid)
        return self.kernel[grid]


@pytest.mark.parametrize(("num_splits", "window", "launched"), [(2, None, 2), (3, 11, 2), (5, None, 4), (4, 40, 3)])
def test_decode_split_k_matches_torch(monkeypatch: pytest.MonkeyPatch, num_splits: int, window: int | None,
                                      launched: int) -> None:
    """Forced partitions, merged by the second kernel, equal the unsplit result.

    The table is 14 blocks of 16 (224 positions) wide; partitions are whole tiles
    (TILE_N), so 5 asked become 4 of 64 positions, and with a window only its
    span is split (11 -> 2 partitions of 32, 40 -> 3). Sequences of 1 and 31
    tokens leave their later partitions empty; windows leave whole tiles before
    the first visible key.
    """
    seq_lens = [1, 31, 70, 150, 200]
    q, kc, vc, table, lens = _paged_batch(seq_lens, 16, group=2, seed=num_splits)
    decode_spy = _GridSpy(kernel_module._paged_decode_kernel)
    merge_spy = _GridSpy(kernel_module._merge_partitions_kernel)
    monkeypatch.setattr(kernel_module, "_paged_decode_kernel", decode_spy)
    monkeypatch.setattr(kernel_module, "_merge_partitions_kernel", merge_spy)
    got = paged_decode_attention(q, kc, vc, table, lens, 0.3, window, num_splits=num_splits)
    assert decode_spy.grids == [(len(seq_lens), NUM_KV_HEADS, launched)]
    assert merge_spy.grids == [(len(seq_lens), NUM_KV_HEADS * 2)]
    torch.testing.assert_close(got, decode_attention_torch(q, kc, vc, table, lens, 0.3, window),
                               rtol=1e-5, atol=1e-5)


def test_decode_split_rule() -> None:
    assert decode_splits(batch=64, num_kv_heads=8, span=4096) == 1  # 512 programs fill the GPU already
    assert decode_splits(batch=1, num_kv_heads=8, span=4096) == 16  # 4096 / SPLIT_MIN_TOKENS
    assert decode_splits(batch=2, num_kv_heads=8, span=1 << 20) == 17  # ceil(264 / 16) programs' worth
    assert decode_splits(batch=1, num_kv_heads=1, span=1 << 20) == SPLIT_MAX
    assert decode_splits(batch=1, num_kv_heads=2, span=200) == 1  # too short to split


def test_decode_split_by_default_for_one_long_sequence() -> None:
    # One 600-token sequence on 2 kv heads: the rule picks 3 partitions (624 table positions / 256).
    q, kc, vc, table, lens = _paged_batch([600], 16, group=4, seed=9)
    assert decode_splits(1, NUM_KV_HEADS, table.shape[1] * 16) == 3
    got = paged_decode_attention(q, kc, vc, table, lens, 0.25)
    torch.testing.assert_close(got, decode_attention_torch(q, kc, vc, table, lens, 0.25), rtol=1e-5, atol=1e-5)


# --- store_kv ------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_store_kv_matches_torch(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(1)
    num_blocks, block_size, num_tokens = 6, 8, 11
    shape = (num_blocks, block_size, NUM_KV_HEADS, HEAD_DIM)
    k_cache = torch.randn(shape, generator=gen).to(dtype)
    v_cache = torch.randn(shape, generator=gen).to(dtype)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    slots[[0, 4, 10]] = -1  # padding tokens, first and last included
    # key as a non-contiguous view (a [T, D, Hkv] buffer transposed), value contiguous.
    key = torch.randn(num_tokens, HEAD_DIM, NUM_KV_HEADS, generator=gen).to(dtype).transpose(1, 2)
    value = torch.randn(num_tokens, NUM_KV_HEADS, HEAD_DIM, generator=gen).to(dtype)

    got_k, got_v = k_cache.clone(), v_cache.clone()
    store_kv(key, value, got_k, got_v, slots)
    want_k, want_v = k_cache.clone(), v_cache.clone()
    store_kv_torch(key, value, want_k, want_v, slots)
    assert torch.equal(got_k, want_k) and torch.equal(got_v, want_v)
    # Exactly the valid slots changed: nothing written for slot -1, nothing elsewhere.
    changed = (got_k != k_cache).flatten(2).any(-1).flatten()
    assert set(changed.nonzero().flatten().tolist()) <= set(slots[slots >= 0].tolist())


def test_store_kv_empty_and_all_skipped() -> None:
    k_cache, v_cache = torch.randn(2, 4, 1, HEAD_DIM), torch.randn(2, 4, 1, HEAD_DIM)
    before_k, before_v = k_cache.clone(), v_cache.clone()
    empty = torch.empty(0, 1, HEAD_DIM)
    store_kv(empty, empty, k_cache, v_cache, torch.empty(0, dtype=torch.int64))
    kv = torch.randn(3, 1, HEAD_DIM)
    store_kv(kv, kv, k_cache, v_cache, torch.full((3,), -1, dtype=torch.int64))
    assert torch.equal(k_cache, before_k) and torch.equal(v_cache, before_v)


# --- through engine.attention with backend="triton" ----------------------------------------------

@pytest.mark.parametrize("window", [None, 6])
def test_paged_attention_backend_triton_matches_torch(window: int | None) -> None:
    """The `_backend_ops` contract: store, decode, then every prefill chunk in one kernel call."""
    gen = torch.Generator().manual_seed(5)
    block_size, heads, num_blocks = 8, NUM_KV_HEADS * 2, 10
    # Two decodes (contexts 9 and 17), a 5-token prefill chunk after 3 cached tokens, a fresh 7-token one.
    query_lens, seq_lens = [1, 1, 5, 7], [9, 17, 8, 7]
    table = torch.tensor([[3, 7, 0], [1, 9, 4], [6, 2, 0], [5, 8, 0]])
    slot_rows = [[p for p in range(n - q, n)] for q, n in zip(query_lens, seq_lens, strict=True)]
    slots = torch.tensor([int(table[i, p // block_size]) * block_size + p % block_size
                          for i, row in enumerate(slot_rows) for p in row])
    num_tokens = len(slots)
    query = torch.randn(num_tokens, heads, HEAD_DIM, generator=gen)
    key = torch.randn(num_tokens, NUM_KV_HEADS, HEAD_DIM, generator=gen)
    value = torch.randn(num_tokens, NUM_KV_HEADS, HEAD_DIM, generator=gen)
    cache_shape = (num_blocks, block_size, NUM_KV_HEADS, HEAD_DIM)
    caches = (torch.randn(cache_shape, generator=gen), torch.randn(cache_shape, generator=gen))

    outs = {}
    for backend in ("torch", "triton"):
        kv = [(caches[0].clone(), caches[1].clone())]
        ctx = ForwardContext(kv_caches=kv, slot_mapping=slots, query_lens=query_lens, seq_lens=seq_lens,
                             block_tables=table, num_decodes=2, decode_seq_lens=torch.tensor(seq_lens[:2]),
                             backend=backend)
        outs[backend] = (paged_attention(ctx, 0, query, key, value, 0.25, window), kv[0])
        if backend == "triton":  # filled on first use: offsets relative to the first prefill row
            assert ctx.prefill_query_start.tolist() == [0, 5, 12] and ctx.prefill_seq_lens.tolist() == [8, 7]
    torch.testing.assert_close(outs["triton"][0], outs["torch"][0], rtol=1e-5, atol=1e-5)
    assert torch.equal(outs["triton"][1][0], outs["torch"][1][0])
    assert torch.equal(outs["triton"][1][1], outs["torch"][1][1])


# --- compilation for a real GPU target -----------------------------------------------------------

# Runs in a fresh interpreter without TRITON_INTERPRET: with it set, @triton.jit
# yields an InterpretedFunction, which triton.compile cannot take (no cache_key).
# Triton's wheel ships its own ptxas, so compilation reaches cubin with no GPU or
# CUDA install. TRITON_CACHE_DIR is private to the run so every stage really runs.
_COMPILE_SCRIPT = textwrap.dedent("""
    import json, sys
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from engine.kernels.cache_write import _store_kv_kernel
    from engine.kernels.paged_attention import _merge_partitions_kernel, _paged_decode_kernel
    from engine.kernels.prefill_attention import _paged_prefill_kernel

    def compile_one(kernel, pointers, scalars, constexprs, arch):
        # Signature: every parameter by name; pointers "*<dtype>", scalars "i32"/"fp32",
        # compile-time parameters "constexpr" with their values in `constexprs`.
        sig = {name: "i32" for name in kernel.arg_names}
        sig.update(pointers)
        sig.update(scalars)
        sig.update({name: "constexpr" for name in constexprs})
        src = ASTSource(fn=kernel, signature=sig, constexprs=constexprs)
        options = {"num_warps": 4, "enable_fp_fusion": True}
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
        ptx = compiled.asm.get("ptx", "")
        target = next((line.split()[1] for line in ptx.splitlines() if line.startswith(".target")), None)
        return {"stages": list(compiled.asm), "ptx_target": target,
                "cubin_bytes": len(compiled.asm.get("cubin", b""))}

    def decode(dtype, arch, split=False):
        ptrs = {"out_ptr": "*" + dtype, "part_m_ptr": "*fp32", "part_l_ptr": "*fp32", "part_acc_ptr": "*fp32",
                "q_ptr": "*" + dtype, "k_cache_ptr": "*" + dtype, "v_cache_ptr": "*" + dtype,
                "block_tables_ptr": "*i64", "seq_lens_ptr": "*i64"}
        consts = {"QUERIES_PER_KV": 4, "NUM_HEADS": 32, "HEAD_DIM": 128, "BLOCK_SIZE": 16, "GROUP_PAD": 16,
                  "HEAD_DIM_PAD": 128, "TILE": 32, "SLIDING": True, "SPLIT": split,
                  "DOT_PRECISION": "ieee" if dtype == "fp32" else "tf32", "DOT_FP32": False}
        return compile_one(_paged_decode_kernel, ptrs, {"qk_scale": "fp32"}, consts, arch)

    def merge(arch):
        ptrs = {"out_ptr": "*bf16", "part_m_ptr": "*fp32", "part_l_ptr": "*fp32", "part_acc_ptr": "*fp32"}
        consts = {"NUM_HEADS": 32, "HEAD_DIM": 128, "SPLITS_PAD": 16, "HEAD_DIM_PAD": 128}
        return compile_one(_merge_partitions_kernel, ptrs, {}, consts, arch)

    def prefill(dtype, arch, head_dim=128, group=4, sliding=True):
        ptrs = {"out_ptr": "*" + dtype, "q_ptr": "*" + dtype, "k_cache_ptr": "*" + dtype,
                "v_cache_ptr": "*" + dtype, "block_tables_ptr": "*i64", "query_start_ptr": "*i32",
                "seq_lens_ptr": "*i64"}
        pad = max(16, 1 << (head_dim - 1).bit_length())
        consts = {"QUERIES_PER_KV": group, "HEAD_DIM": head_dim, "BLOCK_SIZE": 16, "GROUP_PAD": group,
                  "TILE_Q": 64 // group, "HEAD_DIM_PAD": pad, "TILE": 32, "SLIDING": sliding,
                  "DOT_PRECISION": "ieee" if dtype == "fp32" else "tf32", "DOT_FP32": False}
        return compile_one(_paged_prefill_kernel, ptrs, {"qk_scale": "fp32"}, consts, arch)

    def store(dtype, arch):
        ptrs = {"key_ptr": "*" + dtype, "value_ptr": "*" + dtype, "k_cache_ptr": "*" + dtype,
                "v_cache_ptr": "*" + dtype, "slot_ptr": "*i64"}
        consts = {"NUM_KV_HEADS": 8, "HEAD_DIM": 128, "BLOCK_SIZE": 16, "HEADS_PAD": 8, "HEAD_DIM_PAD": 128}
        return compile_one(_store_kv_kernel, ptrs, {}, consts, arch)

    results = {
        "decode-fp32-sm90": decode("fp32", 90),
        "decode-bf16-sm90": decode("bf16", 90),
        "decode-split-bf16-sm90": decode("bf16", 90, split=True),
        "merge-sm90": merge(90),
        "prefill-fp32-sm90": prefill("fp32", 90),
        "prefill-bf16-sm90": prefill("bf16", 90),
        "prefill-fp16-d256-sm90": prefill("fp16", 90, head_dim=256, group=1, sliding=False),
        "store-bf16-sm90": store("bf16", 90),
        "decode-bf16-sm80": decode("bf16", 80),
        "decode-split-fp16-sm80": decode("fp16", 80, split=True),
        "prefill-bf16-d80-sm80": prefill("bf16", 80, head_dim=80, group=2),
        "store-fp32-sm80": store("fp32", 80),
    }
    json.dump(results, sys.stdout)
""")


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path_factory.mktemp("triton_cache"))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", ["decode-fp32-sm90", "decode-bf16-sm90", "decode-split-bf16-sm90", "merge-sm90",
                                  "prefill-fp32-sm90", "prefill-bf16-sm90", "prefill-fp16-d256-sm90",
                                  "store-bf16-sm90", "decode-bf16-sm80", "decode-split-fp16-sm80",
                                  "prefill-bf16-d80-sm80", "store-fp32-sm80"])
def test_compiles_to_cubin(compiled: dict, case: str) -> None:
    result = compiled[case]
    arch = case.rsplit("-", 1)[1]  # "sm90"
    assert result["stages"][-2:] == ["ptx", "cubin"], result
    assert result["ptx_target"] in (f"sm_{arch[2:]}", f"sm_{arch[2:]}a"), result  # sm_90a: Hopper features
    assert result["cubin_bytes"] > 0, result

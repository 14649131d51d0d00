"""The C paged decode attention kernel (engine/cpu_attention.py) against the torch path."""

from __future__ import annotations

import logging
from dataclasses import replace

import pytest
import torch

from engine import LLM, EngineConfig, SamplingParams, cpu_attention
from engine.attention import decode_attention_torch
from engine.engine import _resolve_backend
from engine.kv_cache import KVLayout
from tests.engine_helpers import assert_all_free, hf_greedy, random_paged_batch, random_prompts

CPU = torch.device("cpu")

pytestmark = pytest.mark.skipif(not cpu_attention.available(), reason="no C compiler on this machine")


def _paged_batch(seq_lens: list[int], block_size: int, num_kv_heads: int, group: int, head_dim: int, seed: int = 0):
    return random_paged_batch(seq_lens, block_size, num_kv_heads, group, head_dim, seed=seed)


@pytest.mark.parametrize("block_size", [1, 16, 32])
@pytest.mark.parametrize(("num_kv_heads", "group", "head_dim"), [(4, 3, 64), (2, 1, 128), (1, 8, 16)])
@pytest.mark.parametrize("window", [None, 5, 40])
def test_matches_the_torch_path(block_size: int, num_kv_heads: int, group: int, head_dim: int,
                                window: int | None) -> None:
    lens = [1, block_size, 3 * block_size + 2, 70, 2 * block_size - 1, 129]
    q, kc, vc, table, seq_lens = _paged_batch(lens, block_size, num_kv_heads, group, head_dim)
    expected = decode_attention_torch(q, kc, vc, table, seq_lens, 0.125, window)
    got = cpu_attention.paged_decode_attention(q, kc, vc, table, seq_lens, 0.125, window)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scale", [1e-3, 0.125, 4.0])
def test_matches_the_torch_path_from_flat_to_peaked_attention(scale: float) -> None:
    """The kernel's own exp: near-uniform weights, and scores hundreds below the max (exp underflows)."""
    lens = list(range(1, 34)) + [255, 256, 257]  # every tail length of a 16-lane vector
    q, kc, vc, table, seq_lens = _paged_batch(lens, 16, 4, 3, 64, seed=2)
    expected = decode_attention_torch(q, kc, vc, table, seq_lens, scale)
    got = cpu_attention.paged_decode_attention(q, kc, vc, table, seq_lens, scale)
    tol = 1e-5 * max(1.0, scale)  # logits of size ~100 carry float32 rounding of ~1e-5 whatever the order of the sum
    torch.testing.assert_close(got, expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("window", [None, 40])
def test_a_bfloat16_cache_is_read_exactly(window: int | None) -> None:
    """bfloat16 widens to float32 exactly, so the kernel on a bfloat16 cache is the float32 computation on
    the same values, rounded once at the end."""
    lens = [1, 16, 50, 70, 129, 300]
    q, kc, vc, table, seq_lens = _paged_batch(lens, 16, 4, 3, 64, seed=3)
    q, kc, vc = q.bfloat16(), kc.bfloat16(), vc.bfloat16()
    expected = decode_attention_torch(q.float(), kc.float(), vc.float(), table, seq_lens, 0.125, window)
    got = cpu_attention.paged_decode_attention(q, kc, vc, table, seq_lens, 0.125, window)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected, rtol=2**-8, atol=1e-5)  # one bfloat16 rounding


def test_two_threads_give_the_same_result() -> None:
    q, kc, vc, table, seq_lens = _paged_batch(list(range(1, 300, 7)), 16, 4, 3, 64, seed=1)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpu_attention.paged_decode_attention(q, kc, vc, table, seq_lens, 0.125)
        torch.set_num_threads(2)
        two = cpu_attention.paged_decode_attention(q, kc, vc, table, seq_lens, 0.125)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)  # each sequence is computed whole by one thread: bit-identical


def test_refuses_what_it_does_not_handle() -> None:
    q, kc, vc, table, seq_lens = _paged_batch([5, 9], 16, 2, 2, 32)
    with pytest.raises(TypeError, match="float32 or bfloat16"):
        cpu_attention.paged_decode_attention(q.half(), kc.half(), vc.half(), table, seq_lens, 0.1)
    with pytest.raises(TypeError, match="of one dtype"):
        cpu_attention.paged_decode_attention(q, kc, vc.bfloat16(), table, seq_lens, 0.1)
    q, kc, vc, table, seq_lens = _paged_batch([5, 9], 16, 2, 2, 24)
    with pytest.raises(ValueError, match="multiple of 16"):
        cpu_attention.paged_decode_attention(q, kc, vc, table, seq_lens, 0.1)
    assert not cpu_attention.supports("float16", 64) and not cpu_attention.supports("float32", 24)
    assert cpu_attention.supports("bfloat16", 64)


def test_auto_picks_it_on_the_cpu_and_falls_back_where_it_does_not_fit() -> None:
    fits = KVLayout(num_layers=2, num_kv_heads=4, head_dim=64, block_size=16, dtype="float32")
    assert _resolve_backend("auto", fits, CPU) == "cpu"
    assert _resolve_backend("auto", replace(fits, dtype="bfloat16"), CPU) == "cpu"
    half = KVLayout(num_layers=2, num_kv_heads=4, head_dim=64, block_size=16, dtype="float16")
    assert _resolve_backend("auto", half, CPU) == "torch"
    with pytest.raises(ValueError, match="attention_backend 'cpu'"):
        _resolve_backend("cpu", half, CPU)
    # CUDA takes the Triton kernels; a CPU kernel cannot read a meta (or CUDA) cache
    assert _resolve_backend("auto", fits, torch.device("cuda")) == "triton"
    assert _resolve_backend("auto", fits, torch.device("meta")) == "torch"


def test_a_failed_build_leaves_the_torch_path(monkeypatch, tmp_path, caplog) -> None:
    monkeypatch.setenv("PDSERVE_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
    with caplog.at_level(logging.WARNING, logger="engine.cpu_attention"):
        assert cpu_attention.load.__wrapped__() is None
    assert "torch path" in caplog.text
    assert not list(tmp_path.iterdir())  # no half-written library left behind


def test_builds_into_an_empty_cache(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("PDSERVE_KERNEL_CACHE", str(tmp_path / "kernels"))
    assert cpu_attention.load.__wrapped__() is not None
    assert [p.suffix for p in (tmp_path / "kernels").iterdir()] == [".so"]
    assert (tmp_path / "kernels").stat().st_mode & 0o777 == 0o700  # created private


@pytest.mark.parametrize("loose", ["folder", "library"])
def test_a_library_others_could_write_is_not_loaded(monkeypatch, tmp_path, caplog, loose: str) -> None:
    cache = tmp_path / "kernels"
    monkeypatch.setenv("PDSERVE_KERNEL_CACHE", str(cache))
    assert cpu_attention.load.__wrapped__() is not None  # built and trusted
    (cache if loose == "folder" else next(cache.iterdir())).chmod(0o777)
    with caplog.at_level(logging.WARNING, logger="engine.cpu_attention"):
        assert cpu_attention.load.__wrapped__() is None
    assert "writable by nobody else" in caplog.text


def test_engine_on_the_cpu_kernel_equals_transformers() -> None:
    llm = LLM(attention_backend="cpu", kv_cache_bytes=8 << 20)
    assert llm.engine.runner.backend == "cpu"
    prompts = random_prompts([5, 17, 40, 33], llm.engine.vocab_size, seed=7)
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    outs = llm.generate(prompts, params)
    for prompt, out in zip(prompts, outs, strict=True):
        assert out.outputs[0].token_ids == hf_greedy(llm.engine.model_path, prompt, 20)[0]
    assert_all_free(llm)
    assert EngineConfig(attention_backend="cpu").attention_backend == "cpu"



def test_a_bfloat16_engine_takes_the_kernel_and_follows_the_torch_path() -> None:
    """bfloat16 engines decode through the kernel by default. The kernel rounds once where SDPA in bfloat16
    rounds at every op, so long greedy runs may part; the first decode steps must agree."""
    outputs = {}
    for backend in ("auto", "torch"):
        llm = LLM(dtype="bfloat16", attention_backend=backend, kv_cache_bytes=8 << 20)
        assert llm.engine.runner.backend == ("cpu" if backend == "auto" else "torch")
        prompts = random_prompts([5, 17, 40, 90], llm.engine.vocab_size, seed=7)
        params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True, logprobs=0)
        outputs[backend] = [out.outputs[0] for out in llm.generate(prompts, params)]
        assert_all_free(llm)
    for kernel, torch_path in zip(outputs["auto"], outputs["torch"], strict=True):
        assert kernel.token_ids == torch_path.token_ids
        for token, a, b in zip(kernel.token_ids, kernel.logprobs, torch_path.logprobs, strict=True):
            assert abs(a[token] - b[token]) < 0.25  # bfloat16 logits: ~3 significant digits


def test_decode_attention_benchmark_quick_mode(capsys) -> None:
    from bench.decode_attention import main

    assert main(["--contexts", "40", "--threads", "1", "--repeats", "3", "--pool-blocks", "64",
                 "--dtypes", "float32,bfloat16"]) == 0
    row = capsys.readouterr().out.strip().splitlines()[-1]
    assert row.startswith("| 40 | 1 | bfloat16 |") and float(row.split("|")[4]) > 0

"""Device placement: every tensor of a step lives on the engine's device.

No GPU here, so torch's `meta` device stands in for CUDA: ops run on shapes
without data, and a CPU tensor mixed into a meta op raises ("expected ... on
the same device"). An engine built with device="meta" therefore runs prepare,
the forward (torch attention path), KV import/export and the profiling step
only if none of them creates a tensor on the CPU. Where a value is needed
(sampled token ids) the meta run stops; the tests feed a token by hand there.
"""

from __future__ import annotations

import logging

import pytest
import torch

from cluster.products import ProductConfig, Role
from engine import device as engine_device
from engine import engine as engine_module
from engine.config import EngineConfig, SamplingParams
from engine.device import cpu_computes_bfloat16, resolve_device, resolve_dtype
from engine.engine import Engine, context_limit
from engine.kv_cache import KVLayout, PagedKVCache
from engine.memory_profile import kv_budget_bytes, profile_step
from engine.model import load_config

PROMPT = list(range(3, 40))  # 37 tokens: two full blocks of 16 and a partial one


@pytest.fixture(scope="module")
def meta_engine() -> Engine:
    return Engine(EngineConfig(model="tiny", device="meta", num_kv_blocks=64, max_num_batched_tokens=24))


def _run_until_decoding(engine: Engine, request_id: str, prompt: list[int]) -> None:
    """Prefill `prompt` (in chunks of max_num_batched_tokens) and one decode step, all on meta."""
    engine.add_request(prompt, SamplingParams(max_tokens=8), request_id=request_id)
    for _ in range(4):
        batch, logits = engine.execute_model(engine.scheduler.schedule())
        assert logits.device.type == "meta" and logits.shape == (len(batch.sample_requests), engine.vocab_size)
        for req in batch.sample_requests:  # where a sampled value would be needed: feed one
            req.append_token(5)
        if any(r.request_id == request_id and r.num_output_tokens >= 2 for r in batch.sample_requests):
            return
    raise AssertionError("the request never decoded")


def test_engine_on_meta_places_everything_there(meta_engine: Engine) -> None:
    assert meta_engine.device.type == "meta" and meta_engine.dtype == "float32"
    assert meta_engine.kv_cache.data.device.type == "meta"
    assert {p.device.type for p in meta_engine.model.parameters()} == {"meta"}
    assert meta_engine.linear_backend == "torch" and meta_engine.attention_backend == "torch"


def test_prefill_chunks_and_decodes_run_on_meta(meta_engine: Engine) -> None:
    # 37 tokens in 24-token chunks: a fresh chunk, a chunk after cached tokens (gathered from the paged
    # cache), then decodes through the bucketed decode path.
    _run_until_decoding(meta_engine, "a", PROMPT)
    batch = meta_engine.runner.prepare([(meta_engine.requests["a"], 1)])
    for t in (batch.input_ids, batch.positions, batch.logits_indices, batch.ctx.slot_mapping,
              batch.ctx.block_tables, batch.ctx.decode_seq_lens):
        assert t.device.type == "meta"
    meta_engine.abort_request("a")


def test_prefix_hit_and_kv_import_export_on_meta(meta_engine: Engine) -> None:
    _run_until_decoding(meta_engine, "first", PROMPT)
    # a second request over the same prompt reads the first one's blocks from the prefix cache
    _run_until_decoding(meta_engine, "hit", PROMPT)
    assert meta_engine.requests["hit"].num_cached_tokens == 32
    # export: a held request's blocks come back on the host side of meta (meta itself)
    held = meta_engine.add_request(PROMPT[:20], SamplingParams(max_tokens=1), request_id="held", hold_kv=True)
    batch, _ = meta_engine.execute_model(meta_engine.scheduler.schedule())
    assert held in batch.sample_requests
    blocks = meta_engine.kv_cache.read_blocks([b.block_id for b in held.block_table])
    assert blocks.device.type == "meta" and tuple(blocks.shape) == meta_engine.layout.blocks_shape(2)
    # import: a deferred request gets KV from elsewhere, written into its blocks when admitted
    other = [50 + t for t in PROMPT]
    meta_engine.add_request(other, SamplingParams(max_tokens=4), request_id="imported", defer=True)
    meta_engine.attach_kv("imported", torch.empty(meta_engine.layout.blocks_shape(2), device="meta"), 32)
    meta_engine.enqueue("imported")
    meta_engine.execute_model(meta_engine.scheduler.schedule())
    assert meta_engine.requests["imported"].num_computed_tokens == len(other)
    for rid in ("first", "hit", "imported"):
        meta_engine.abort_request(rid)


def test_a_cpu_tensor_in_a_meta_step_raises(meta_engine: Engine) -> None:
    """The check above is real: the same step with one host tensor in it fails."""
    meta_engine.add_request(PROMPT[:10], SamplingParams(max_tokens=2), request_id="mixed")
    batch = meta_engine.runner.prepare(meta_engine.scheduler.schedule().scheduled)
    batch.ctx.slot_mapping = torch.zeros(batch.ctx.slot_mapping.shape, dtype=torch.long)
    with pytest.raises(RuntimeError, match="device"):
        meta_engine.runner.forward(batch)
    meta_engine.abort_request("mixed")


def test_profiling_step_runs_on_the_device(meta_engine: Engine) -> None:
    profile_step(meta_engine.model, meta_engine.layout, "torch", torch.device("meta"),
                 EngineConfig(model="tiny", max_num_batched_tokens=40, max_num_seqs=8))


def test_kv_cache_copies_stay_on_device() -> None:
    layout = KVLayout(num_layers=2, num_kv_heads=2, head_dim=4, block_size=4, dtype="float32")
    cache = PagedKVCache(layout, 6, "meta")
    cache.copy_blocks([0, 1], [2, 3])
    cache.write_blocks([4], torch.empty(layout.blocks_shape(1), device="meta"))
    assert cache.read_blocks([4, 5]).device.type == "meta"


def test_kv_cache_round_trip_on_cpu_is_exact() -> None:
    layout = KVLayout(num_layers=2, num_kv_heads=2, head_dim=4, block_size=4, dtype="bfloat16")
    cache = PagedKVCache(layout, 6)
    data = torch.randn(layout.blocks_shape(2)).to(torch.bfloat16)
    cache.write_blocks([4, 1], data)
    assert torch.equal(cache.read_blocks([4, 1]), data)
    cache.copy_blocks([4, 1], [0, 4])  # overlapping source and destination
    assert torch.equal(cache.read_blocks([0, 4]), data)


# --- resolution: device, dtype, KV pool size --------------------------------------------------------

def test_auto_device_and_dtype_follow_the_hardware() -> None:
    want = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == want
    assert resolve_dtype("auto", torch.device("cuda")) == "bfloat16"
    assert resolve_dtype("auto", torch.device("cpu")) == "float32"
    assert resolve_dtype("float16", torch.device("cuda")) == "float16"


@pytest.mark.parametrize("name", ["gpu", "cuda:x", "cuda:", "CPU", ""])
def test_bad_device_names_are_refused(name: str) -> None:
    with pytest.raises(ValueError, match="device"):
        EngineConfig(device=name)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_asked_for_without_a_gpu_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="torch sees no CUDA GPU"):
        Engine(EngineConfig(model="tiny", device="cuda", num_kv_blocks=8))


def test_cpu_engine_takes_the_cpu_fast_paths() -> None:
    engine = Engine(EngineConfig(model="tiny", device="cpu", num_kv_blocks=8))
    assert engine.dtype == "float32" and engine.kv_cache.data.device.type == "cpu"
    with pytest.raises(ValueError, match="needs the CPU"):
        Engine(EngineConfig(model="tiny", device="meta", attention_backend="cpu", num_kv_blocks=8))


def test_a_pool_sized_from_gpu_memory_does_not_cap_the_context_in_advance() -> None:
    hf = load_config(Engine(EngineConfig(model="tiny", num_kv_blocks=4)).model_path)
    on_gpu = EngineConfig(model="tiny", device="cuda")
    assert context_limit(on_gpu, hf) == hf.max_position_embeddings
    assert context_limit(on_gpu, hf, num_blocks=10) == 160  # the engine's own pool caps it
    # 2^18 bytes in bfloat16 blocks (the CUDA default) of 4 KiB: 64 blocks of 16 tokens
    assert context_limit(EngineConfig(model="tiny", device="cuda", kv_cache_bytes=1 << 18), hf) == 1024


def test_kv_budget_is_what_the_fraction_leaves() -> None:
    gib = 1 << 30
    assert kv_budget_bytes(0.9, 100 * gib, in_use=10 * gib, step_peak=2 * gib) == int(0.9 * 100 * gib) - 12 * gib
    with pytest.raises(ValueError, match="gpu_memory_utilization=0.1 .* no room for KV"):
        kv_budget_bytes(0.1, 100 * gib, in_use=10 * gib, step_peak=1)


def test_a_role_with_a_gpu_runs_its_engine_on_cuda() -> None:
    product = ProductConfig(name="p", model="tiny", prefill=Role(num_gpus=1), decode=Role())
    assert product.engine_config(product.prefill).device == "cuda"
    assert product.engine_config(product.decode).device == "cpu"
    pinned = ProductConfig(name="q", model="tiny", engine={"device": "cpu"}, prefill=Role(num_gpus=1))
    assert pinned.engine_config(pinned.prefill).device == "cpu"


@pytest.mark.parametrize("flags, native", [("flags : fpu avx512f avx512_bf16 avx512_vnni", True),
                                           ("flags : fpu amx_tile amx_bf16", True),
                                           ("flags : fpu avx2 avx512f avx512bw", False)])
def test_a_cpu_computes_bfloat16_with_avx512_bf16_or_amx(monkeypatch, flags: str, native: bool) -> None:
    monkeypatch.setattr(engine_device, "cpu_flags", lambda: flags)
    assert cpu_computes_bfloat16() is native


@pytest.mark.parametrize("native", [True, False])
def test_a_bfloat16_engine_on_a_cpu_that_emulates_it_says_so(monkeypatch, caplog, native: bool) -> None:
    monkeypatch.setattr(engine_module, "cpu_computes_bfloat16", lambda: native)
    with caplog.at_level(logging.WARNING, logger="engine.engine"):
        engine = Engine(EngineConfig(dtype="bfloat16", kv_cache_bytes=8 << 20))
    assert engine.dtype == "bfloat16"
    assert ("emulated, slower than float32" in caplog.text) is not native

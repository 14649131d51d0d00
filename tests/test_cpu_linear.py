"""oneDNN linear layers with packed weights (engine/cpu_linear.py) against nn.Linear, and one-call RMSNorms
(engine/cpu_norm.py) against transformers' own."""

from __future__ import annotations

import gc

import psutil
import pytest
import torch
from torch import nn

from engine import LLM, SamplingParams, cpu_linear, cpu_norm, tiny_model
from engine.engine import _resolve_linear_backend
from tests.engine_helpers import assert_all_free, hf_greedy, hf_model, random_prompts

pytestmark = pytest.mark.skipif(not cpu_linear.supports(torch.float32), reason="torch built without oneDNN")


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(1, 96), (5, 96), (2, 7, 96), (300, 96)])
def test_matches_nn_linear_in_float32(bias: bool, shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    linear = nn.Linear(96, 80, bias=bias)
    x = torch.randn(*shape)
    expected = linear(x)
    got = cpu_linear.PackedLinear.of(linear)(x)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_matches_nn_linear_in_bfloat16() -> None:
    torch.manual_seed(1)
    linear = nn.Linear(128, 64, bias=True).to(torch.bfloat16)
    x = torch.randn(6, 128, dtype=torch.bfloat16)
    got = cpu_linear.PackedLinear.of(linear)(x)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), linear(x).float(), rtol=2e-2, atol=2e-2)


def test_accepts_a_strided_input() -> None:
    linear = nn.Linear(32, 16)
    x = torch.randn(4, 64)[:, ::2]  # a view with stride 2, as slicing a packed row gives
    torch.testing.assert_close(cpu_linear.PackedLinear.of(linear)(x), linear(x), rtol=1e-5, atol=1e-5)


def test_pack_linears_replaces_every_linear_and_nothing_else() -> None:
    model = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 8), nn.LayerNorm(8),
                          nn.Sequential(nn.Linear(8, 4, bias=False), nn.ReLU()))
    x = torch.randint(0, 10, (3,))
    expected = model(x)
    assert cpu_linear.pack_linears(model) == 2
    assert not any(type(m) is nn.Linear for m in model.modules())
    assert isinstance(model[0], nn.Embedding) and isinstance(model[2], nn.LayerNorm)
    # The dense weights went with the modules: only embedding and norm parameters remain.
    assert sum(p.numel() for p in model.parameters()) == 10 * 8 + 2 * 8
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
    assert cpu_linear.pack_linears(model) == 0  # packing twice is a no-op


class _SwappedMLP(nn.Module):
    """Shaped like a gated MLP but computing act(up) * gate: must not be fused as one."""

    def __init__(self) -> None:
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(16, 24, bias=False), nn.Linear(16, 24, bias=False)
        self.down_proj, self.act_fn = nn.Linear(24, 16, bias=False), nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.up_proj(x)) * self.gate_proj(x))


@pytest.mark.parametrize("name", ["tiny", "tiny-qwen2", "tiny-mistral"])
def test_gated_mlps_are_fused_and_compute_the_same(name: str) -> None:
    model = hf_model(tiny_model.path(name))
    mlp = model.model.layers[0].mlp
    x = torch.randn(5, model.config.hidden_size)
    with torch.no_grad():
        expected = mlp(x)
    linears = sum(type(m) is nn.Linear for m in model.modules())
    assert cpu_linear.pack_linears(model) == linears
    fused = model.model.layers[0].mlp
    assert isinstance(fused, cpu_linear.PackedGatedMLP)
    assert fused.gate_up.out_features == 2 * model.config.intermediate_size
    with torch.no_grad():
        torch.testing.assert_close(fused(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["tiny", "tiny-qwen2", "tiny-mistral"])
def test_attention_projections_run_as_one_gemm_and_compute_the_same(name: str) -> None:
    model = hf_model(tiny_model.path(name))  # tiny-qwen2: q/k/v with biases
    ids = torch.randint(3, model.config.vocab_size, (1, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = model(ids).logits
    cpu_linear.pack_linears(model)
    attention = model.model.layers[0].self_attn
    assert all(isinstance(getattr(attention, n), cpu_linear.FusedProjection) for n in cpu_linear.QKV_CHILDREN)
    fused = attention.q_proj.fused
    calls = []
    gemm = fused.linear.forward
    fused.linear.forward = lambda x: calls.append(x.shape) or gemm(x)
    with torch.no_grad():
        got = model(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert len(calls) == 1  # one GEMM for the layer's q, k and v
    assert fused._input is None  # all three slices taken: nothing held between forwards


def test_fused_projections_never_serve_a_slice_of_another_input() -> None:
    torch.manual_seed(5)
    attention = nn.Module()
    for n, out in zip(cpu_linear.QKV_CHILDREN, (32, 16, 16), strict=True):
        setattr(attention, n, nn.Linear(32, out))
    x, y = torch.randn(3, 32), torch.randn(3, 32)
    with torch.no_grad():
        expected = {(n, id(t)): getattr(attention, n)(t) for n in cpu_linear.QKV_CHILDREN for t in (x, y)}
        assert cpu_linear.pack_linears(attention) == 3
        # another input, another order, a repeated call: each answer is its own input's projection
        for n, t in (("q_proj", x), ("k_proj", y), ("v_proj", x), ("v_proj", x), ("q_proj", y), ("k_proj", y),
                     ("k_proj", y)):
            torch.testing.assert_close(getattr(attention, n)(t), expected[(n, id(t))], rtol=1e-5, atol=1e-5)


def test_an_mlp_of_the_same_shape_but_another_function_is_not_fused() -> None:
    torch.manual_seed(3)
    model = nn.Sequential(_SwappedMLP())
    x = torch.randn(4, 16)
    expected = model(x)
    assert cpu_linear.pack_linears(model) == 3
    assert isinstance(model[0], _SwappedMLP)  # kept its own forward, with its three linears packed
    assert all(isinstance(getattr(model[0], n), cpu_linear.PackedLinear) for n in ("gate_proj", "up_proj", "down_proj"))
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


def test_resolution() -> None:
    cpu = torch.device("cpu")
    assert _resolve_linear_backend("auto", "float32", cpu) == "onednn"
    assert _resolve_linear_backend("auto", "float16", cpu) == "torch"  # oneDNN does not pack float16 here
    assert _resolve_linear_backend("torch", "float32", cpu) == "torch"
    assert _resolve_linear_backend("auto", "bfloat16", torch.device("cuda")) == "torch"  # CPU packing only
    with pytest.raises(ValueError, match="linear_backend 'onednn'"):
        _resolve_linear_backend("onednn", "float16", cpu)
    with pytest.raises(ValueError, match="linear_backend 'onednn'"):
        _resolve_linear_backend("onednn", "float32", torch.device("meta"))
    with pytest.raises(ValueError, match="linear_backend"):
        LLM(linear_backend="mkl")


def test_engine_on_packed_linears_equals_transformers_and_the_torch_path() -> None:
    packed = LLM(kv_cache_bytes=8 << 20)
    plain = LLM(kv_cache_bytes=8 << 20, linear_backend="torch")
    assert packed.engine.linear_backend == "onednn" and plain.engine.linear_backend == "torch"
    assert any(isinstance(m, cpu_linear.PackedLinear) for m in packed.engine.model.modules())
    assert not any(isinstance(m, cpu_linear.PackedLinear) for m in plain.engine.model.modules())
    prompts = random_prompts([3, 21, 64, 40], packed.engine.vocab_size, seed=11)
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    got = [o.outputs[0].token_ids for o in packed.generate(prompts, params)]
    assert got == [o.outputs[0].token_ids for o in plain.generate(prompts, params)]
    assert got == [hf_greedy(packed.engine.model_path, p, 16)[0] for p in prompts]
    assert_all_free(packed)
    assert_all_free(plain)


def _mappings_of(folder: str) -> int:
    gc.collect()
    return sum(1 for m in psutil.Process().memory_maps(grouped=False) if m.path.startswith(folder))


def test_packing_releases_the_checkpoint_mapping() -> None:
    """Packed copies replace the dense weights in memory: the safetensors file is no longer mapped."""
    path = tiny_model.path("tiny")
    before = _mappings_of(path)
    plain = LLM(path, kv_cache_bytes=4 << 20, linear_backend="torch")
    assert _mappings_of(path) == before + 1  # the dense model views its checkpoint file
    packed = LLM(path, kv_cache_bytes=4 << 20)
    assert _mappings_of(path) == before + 1  # only the plain engine's mapping remains
    del plain, packed


@pytest.mark.parametrize("name", ["tiny", "tiny-qwen2", "tiny-mistral"])
def test_rms_norms_run_as_one_call_and_compute_the_same(name: str) -> None:
    model = hf_model(tiny_model.path(name))
    ids = torch.randint(3, model.config.vocab_size, (1, 7), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        expected = model(ids).logits
    norms = [n for n, m in model.named_modules() if type(m).__name__.endswith("RMSNorm")]
    assert cpu_norm.fuse_rms_norms(model) == len(norms) == 2 * model.config.num_hidden_layers + 1
    assert all(isinstance(model.get_submodule(n), cpu_norm.FusedRMSNorm) for n in norms)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, expected, rtol=1e-5, atol=1e-5)


class _OnePlusRMSNorm(nn.Module):
    """Gemma's form, x_normed * (1 + weight): shaped like an RMSNorm, not one to fuse."""

    def __init__(self) -> None:
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.randn(16)), 1e-6

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * (1.0 + self.weight)


def test_a_norm_of_another_formula_is_not_fused() -> None:
    model = nn.Sequential(_OnePlusRMSNorm())
    assert cpu_norm.fuse_rms_norms(model) == 0
    assert isinstance(model[0], _OnePlusRMSNorm)

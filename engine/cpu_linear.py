"""Linear layers on oneDNN with weights packed once at load, for the CPU.

Why: torch's CPU `nn.Linear` calls MKL's sgemm with the weight as stored. At
the small row counts of decoding (a few sequences, one token each) a step is
bound by streaming the weights, and on this machine (AMD EPYC, AVX-512) MKL
streams them at 6 to 9 GB/s on one thread and gains nothing from a second.
oneDNN, given the weight reordered once into its blocked layout, streams the
same matrices at 13 to 22 GB/s and is faster at every row count we measured
(BENCHMARKS.md, "oneDNN linear layers"). vLLM's CPU backend does the same
(oneDNN matmul over pre-packed weights).

The packed weight replaces the dense one (no second copy), so a packed model
cannot be saved or moved to another device; the engine never does either.
"""

from __future__ import annotations

import torch
from torch import nn

PACKABLE_DTYPES = (torch.float32, torch.bfloat16)


class PackedLinear(nn.Module):
    """y = x W^T + b with W held in oneDNN's blocked layout.

    Same shapes and arithmetic as the nn.Linear it replaces: x [..., in_features]
    -> y [..., out_features]; results differ from MKL's only by summation order.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        # Plain attributes, not parameters: the packed tensor has no strides and
        # must not be visited by .to(), state_dict() or parameter counting.
        self.weight = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)
        self.bias = None if bias is None else bias.detach()

    @classmethod
    def of(cls, linear: nn.Linear) -> PackedLinear:
        return cls(linear.weight, linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class PackedGatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)), transformers' gated MLP (Llama, Qwen2, Mistral...), with gate and up
    as one packed GEMM of 2 x intermediate outputs: one pass over x and one longer weight stream
    instead of two (1.1-1.3x on that GEMM at decode's row counts, BENCHMARKS.md)."""

    def __init__(self, mlp: nn.Module) -> None:
        super().__init__()
        gate, up = mlp.gate_proj, mlp.up_proj
        self.intermediate = gate.out_features
        bias = None if gate.bias is None else torch.cat([gate.bias, up.bias])
        self.gate_up = PackedLinear(torch.cat([gate.weight, up.weight]), bias)
        self.down_proj = PackedLinear.of(mlp.down_proj)
        self.act_fn = mlp.act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).split(self.intermediate, dim=-1)
        return self.down_proj(self.act_fn(gate) * up)


class _FusedQKV:
    """One attention module's q, k and v projections as one packed GEMM, computed once per input.

    transformers' attention calls q_proj, k_proj and v_proj on the same hidden-states tensor; the
    first of the three calls runs the GEMM over all outputs, the other two take their slices.
    Invariant: a slice is served only for the very tensor object the GEMM ran on (held until all
    three slices are taken), so any other input, order or caller gets its own GEMM, never a stale one.
    """

    def __init__(self, q: nn.Linear, k: nn.Linear, v: nn.Linear) -> None:
        self.sizes = [q.out_features, k.out_features, v.out_features]
        bias = None if q.bias is None else torch.cat([q.bias, k.bias, v.bias])
        self.linear = PackedLinear(torch.cat([q.weight, k.weight, v.weight]), bias)
        self._input: torch.Tensor | None = None
        self._parts: tuple[torch.Tensor, ...] = ()
        self._untaken: set[int] = set()

    def part(self, x: torch.Tensor, index: int) -> torch.Tensor:
        if x is not self._input or index not in self._untaken:
            self._input, self._parts, self._untaken = x, self.linear(x).split(self.sizes, dim=-1), {0, 1, 2}
        self._untaken.discard(index)
        out = self._parts[index]
        if not self._untaken:  # all three taken: drop the references
            self._input, self._parts = None, ()
        return out


class FusedProjection(nn.Module):
    """q_proj, k_proj or v_proj of an attention module whose three projections run as one GEMM."""

    def __init__(self, fused: _FusedQKV, index: int, in_features: int) -> None:
        super().__init__()
        self.fused, self.index = fused, index
        self.in_features, self.out_features = in_features, fused.sizes[index]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fused.part(x, self.index)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, part {self.index} of q/k/v"


QKV_CHILDREN = ("q_proj", "k_proj", "v_proj")


def _fuse_qkv(attention: nn.Module) -> bool:
    """Replace attention's q/k/v linears with one fused GEMM; False (unchanged) when they do not fit one."""
    linears = [getattr(attention, n, None) for n in QKV_CHILDREN]
    if not all(type(m) is nn.Linear for m in linears) or not _on_cpu(attention):
        return False
    q, k, v = linears
    if len({m.in_features for m in linears}) != 1 or len({m.weight.dtype for m in linears}) != 1 \
            or len({m.bias is None for m in linears}) != 1 or not supports(q.weight.dtype):
        return False
    fused = _FusedQKV(q, k, v)
    for index, name in enumerate(QKV_CHILDREN):
        setattr(attention, name, FusedProjection(fused, index, q.in_features))
    return True


GATED_MLP_CHILDREN = {"gate_proj", "up_proj", "down_proj", "act_fn"}


def _fuse_gated_mlp(mlp: nn.Module) -> PackedGatedMLP | None:
    """The fused form of `mlp` if it is a gated MLP and computes the same function, else None.

    Shape alone (children named gate/up/down_proj and act_fn) does not prove the
    forward is down(act(gate) * up), so one random input checks it; a module
    that differs keeps its own forward (its linears are still packed one by one).
    """
    children = dict(mlp.named_children())
    if set(children) != GATED_MLP_CHILDREN or not all(
            type(children[n]) is nn.Linear for n in ("gate_proj", "up_proj", "down_proj")):
        return None
    if (mlp.gate_proj.bias is None) != (mlp.up_proj.bias is None) or not supports(mlp.gate_proj.weight.dtype) \
            or not _on_cpu(mlp):
        return None
    fused = PackedGatedMLP(mlp)
    weight = mlp.gate_proj.weight
    return fused if computes_the_same(mlp, fused, weight.shape[1], weight.dtype, tol32=1e-4) else None


def computes_the_same(module: nn.Module, replacement: nn.Module, width: int, dtype: torch.dtype,
                      tol32: float) -> bool:
    """Both give the same output for one seeded random input of 3 x width, within tol32 in float32
    (3e-2 in a 16-bit dtype), relative and scaled to the output's magnitude."""
    x = torch.randn(3, width, generator=torch.Generator().manual_seed(0)).to(dtype)
    with torch.no_grad():
        expected, got = module(x).float(), replacement(x).float()
    tol = tol32 if dtype == torch.float32 else 3e-2
    return torch.allclose(got, expected, rtol=tol, atol=tol * expected.abs().max().item())


def supports(dtype: torch.dtype) -> bool:
    """oneDNN is in this torch build and packs this weight dtype."""
    return dtype in PACKABLE_DTYPES and torch.backends.mkldnn.is_available()


def pack_linears(model: nn.Module) -> int:
    """Replace every CPU nn.Linear under `model` with a PackedLinear, fusing gated MLPs' gate and up
    projections (PackedGatedMLP) and attention's q, k and v projections (FusedProjection); returns
    how many nn.Linear were replaced.

    Only layers whose weight is on the CPU in a packable dtype are replaced, so
    a model that is partly elsewhere keeps those parts unchanged.
    """
    replaced = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, PackedGatedMLP) or not name:
            continue
        fused = _fuse_gated_mlp(module)
        if fused is not None:
            replace_module(model, name, fused)
            replaced += 3
        elif _fuse_qkv(module):
            replaced += 3
    targets = [(name, module) for name, module in model.named_modules()
               if type(module) is nn.Linear and _on_cpu(module) and supports(module.weight.dtype)]
    for name, module in targets:
        replace_module(model, name, PackedLinear.of(module))
    replaced += len(targets)
    if replaced:
        _own_remaining_parameters(model)
    return replaced


def _on_cpu(module: nn.Module) -> bool:
    return all(p.device.type == "cpu" for p in module.parameters())


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, new)


def _own_remaining_parameters(model: nn.Module) -> None:
    """Copy the parameters left (embeddings, norms) out of the checkpoint file's memory mapping.

    transformers loads safetensors through one mapping per file; while any
    parameter still views it, the file's pages that packing read stay mapped
    and counted in the process's RSS beside the packed copies (~1x the linear
    weights again). The remaining parameters are small, so copying them costs
    little and releases the mapping.
    """
    for param in model.parameters():
        param.data = param.data.clone()

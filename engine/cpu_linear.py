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

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        # Plain attributes, not parameters: the packed tensor has no strides and
        # must not be visited by .to(), state_dict() or parameter counting.
        self.weight = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), None)
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def supports(dtype: torch.dtype) -> bool:
    """oneDNN is in this torch build and packs this weight dtype."""
    return dtype in PACKABLE_DTYPES and torch.backends.mkldnn.is_available()


def pack_linears(model: nn.Module) -> int:
    """Replace every CPU nn.Linear under `model` with a PackedLinear; returns how many.

    Only layers whose weight is on the CPU in a packable dtype are replaced, so
    a model that is partly elsewhere keeps those parts unchanged.
    """
    targets = [(name, module) for name, module in model.named_modules()
               if type(module) is nn.Linear and module.weight.device.type == "cpu" and supports(module.weight.dtype)]
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, PackedLinear(module))
    if targets:
        _own_remaining_parameters(model)
    return len(targets)


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

"""Where an engine runs: its torch device, its default dtype, the host side of KV copies.

"auto" is CUDA when torch sees a GPU (Ray hands an engine actor its GPU through
CUDA_VISIBLE_DEVICES, so "cuda" is always the right one), else the CPU. "meta"
runs every op without data: tests use it to prove that a step creates no
tensor on the wrong device (a CPU tensor mixed into a meta op raises).

dtype "auto" follows the device: bfloat16 on CUDA (what GPU serving runs,
tensor-core rate, half the KV bytes), float32 elsewhere (greedy output
token-exact against transformers, and fast on every CPU). On a CPU with
bfloat16 dot-product instructions (AVX512-BF16 or AMX) bfloat16 is the faster
choice, asked for explicitly: half the bytes per weight and KV entry, and
oneDNN's bfloat16 GEMMs. Without them oneDNN emulates it, slower than float32.
"""

from __future__ import annotations

import functools
import platform
from pathlib import Path

import torch

# /proc/cpuinfo flags of the instructions that compute bfloat16 dot products natively
BFLOAT16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")

DEVICE_NAMES = ("auto", "cpu", "cuda", "meta")  # and "cuda:N"


def resolve_device(name: str) -> torch.device:
    """The torch device an engine configured with `name` runs on, here."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> str:
    """The dtype name ("float32", "bfloat16", "float16") for `name` on `device`."""
    if name != "auto":
        return name
    return "bfloat16" if device.type == "cuda" else "float32"


@functools.cache
def cpu_flags() -> str:
    """This CPU's feature flags (the /proc/cpuinfo line; elsewhere the processor's name)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def cpu_computes_bfloat16() -> bool:
    """Whether this CPU has bfloat16 dot-product instructions (a bfloat16 engine is faster than float32 here)."""
    return any(flag in cpu_flags().split() for flag in BFLOAT16_CPU_FLAGS)


def host_device(device: torch.device) -> torch.device:
    """Where tensors that leave the engine live (KV exports, imports): the CPU; meta stays meta."""
    return device if device.type == "meta" else torch.device("cpu")


def check_device_name(name: str) -> str:
    """`name` if it is one of DEVICE_NAMES or "cuda:N"; else ValueError."""
    if name in DEVICE_NAMES or (name.startswith("cuda:") and name[5:].isdigit()):
        return name
    raise ValueError(f"device must be one of {', '.join(DEVICE_NAMES)} or cuda:N, got {name!r}")

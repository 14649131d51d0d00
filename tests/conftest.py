"""Shared pytest setup.

Without CUDA, Triton kernels can only run in its (slow, numpy-based)
interpreter, chosen by TRITON_INTERPRET=1. @triton.jit picks interpreter or
compiler when the decorator runs, i.e. when a kernel module is imported, so the
variable is set here, before any test module imports triton or engine.kernels.
Importing torch first is safe: the CPU build of torch does not import triton.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

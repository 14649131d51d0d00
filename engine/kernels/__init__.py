"""Triton kernels for the paged KV cache (backend == "triton" in engine.attention).

On a machine without CUDA they run only under TRITON_INTERPRET=1, which must be
in the environment before this package (or triton) is first imported.
"""

from engine.kernels.cache_write import store_kv
from engine.kernels.paged_attention import paged_decode_attention
from engine.kernels.prefill_attention import paged_prefill_attention

__all__ = ["paged_decode_attention", "paged_prefill_attention", "store_kv"]

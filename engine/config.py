"""Engine and sampling configuration: frozen, validated at construction.

Every validation error is a ValueError that names the field and the limit, so
callers (the HTTP layer included) can turn it into a 4xx without guessing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

MiB = 1 << 20


@dataclass(frozen=True)
class SamplingParams:
    """How to sample one request's output.

    temperature == 0 means greedy. top_k == 0 disables top-k; top_p == 1.0
    disables nucleus sampling. A request with a seed samples reproducibly:
    the same prompt, params and seed give the same tokens whatever the batch.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    max_tokens: int = 16
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # return the sampled token's logprob plus this many top alternatives

    def __post_init__(self) -> None:
        # Accept lists / a single string from callers, store tuples (hashable, immutable).
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop or ()))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids or ()))
        _check(isinstance(self.n, int) and self.n >= 1, f"n must be an integer >= 1, got {self.n!r}")
        _check(self.max_tokens is not None and int(self.max_tokens) == self.max_tokens and self.max_tokens >= 1,
               f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        _check(self.temperature >= 0.0, f"temperature must be >= 0, got {self.temperature!r}")
        _check(0.0 < self.top_p <= 1.0, f"top_p must be in (0, 1], got {self.top_p!r}")
        _check(isinstance(self.top_k, int) and self.top_k >= 0,
               f"top_k must be an integer >= 0 (0 disables it), got {self.top_k!r}")
        _check(self.logprobs is None or 0 <= self.logprobs <= 20,
               f"logprobs must be in [0, 20], got {self.logprobs!r}")
        _check(all(isinstance(s, str) and s for s in self.stop), "stop must be non-empty strings")
        _check(all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids),
               "stop_token_ids must be integers >= 0")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class EngineConfig:
    """One engine's resources and limits.

    Units: kv_cache_bytes in bytes (split into fixed blocks at start, never
    grown); block_size, max_num_batched_tokens and max_model_len in tokens.
    num_kv_blocks, when set, overrides kv_cache_bytes (tests use it to force
    preemption with an exact block count).
    """

    model: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    block_size: int = 16
    kv_cache_bytes: int = 512 * MiB
    num_kv_blocks: int | None = None
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    enable_prefix_caching: bool = True
    attention_backend: Literal["auto", "torch", "cpu", "triton"] = "auto"  # auto: triton on CUDA, else cpu, else torch
    # Linear layers: "onednn" packs CPU weights once for oneDNN, q/k/v and gate/up fused (engine/cpu_linear.py),
    # and runs RMSNorms as one call (engine/cpu_norm.py); auto: onednn where it applies (CPU, float32 or
    # bfloat16), else the model's own modules as transformers built them.
    linear_backend: Literal["auto", "torch", "onednn"] = "auto"
    # "contiguous": one growing region of consecutive blocks per request, the
    # incident's allocator, kept to measure against (engine/contiguous_kv_cache_manager.py).
    kv_layout: Literal["paged", "contiguous"] = "paged"
    contiguous_reserve: Literal["grow", "max"] = "grow"  # contiguous: grow while decoding, or reserve max at once
    num_threads: int | None = None  # torch intra-op threads; None leaves torch's default
    seed: int = 0

    @classmethod
    def coerce(cls, value: EngineConfig | dict | None) -> EngineConfig:
        """An EngineConfig from itself, a dict of its fields (config files, Ray args) or None (defaults)."""
        return value if isinstance(value, cls) else cls(**(value or {}))

    def __post_init__(self) -> None:
        _check(self.block_size >= 1 and (self.block_size & (self.block_size - 1)) == 0,
               f"block_size must be a power of two >= 1, got {self.block_size}")
        _check(self.max_num_seqs >= 1, f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        _check(self.max_num_batched_tokens >= 1,
               f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
        _check(self.num_kv_blocks is None or self.num_kv_blocks >= 1,
               f"num_kv_blocks must be >= 1, got {self.num_kv_blocks}")
        _check(self.kv_cache_bytes > 0, f"kv_cache_bytes must be > 0, got {self.kv_cache_bytes}")
        _check(self.linear_backend in ("auto", "torch", "onednn"),
               f"linear_backend must be 'auto', 'torch' or 'onednn', got {self.linear_backend!r}")
        _check(self.kv_layout in ("paged", "contiguous"),
               f"kv_layout must be 'paged' or 'contiguous', got {self.kv_layout!r}")
        _check(self.contiguous_reserve in ("grow", "max"),
               f"contiguous_reserve must be 'grow' or 'max', got {self.contiguous_reserve!r}")
        _check(self.kv_layout != "contiguous" or not self.enable_prefix_caching,
               "kv_layout='contiguous' gives each request its own region, so cached prefix blocks cannot be "
               "shared: set enable_prefix_caching=False")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)

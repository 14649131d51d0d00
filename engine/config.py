"""Engine and sampling configuration: frozen, validated at construction.

pydantic dataclasses: each field's type and range is declared beside it and
checked on construction; what spans several fields is checked in
__post_init__. Every validation error is a ValueError (pydantic's
ValidationError is one) that names the field and the limit, so callers (the
HTTP layer included) can turn it into a 4xx without guessing.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import ConfigDict, Field, ValidationError, field_validator
from pydantic.dataclasses import dataclass

from engine.device import check_device_name

MiB = 1 << 20
CPU_KV_CACHE_BYTES = 512 * MiB  # the KV pool when kv_cache_bytes is None and the engine is not on CUDA
# Temperatures below this sample greedily, as vLLM does: dividing logits by 1e-38 overflows to inf and
# the softmax to NaN, while the distribution it stands for is already the argmax.
GREEDY_BELOW = 1e-5
# Unknown fields are errors: a typo in a config file must not be ignored.
_CONFIG = ConfigDict(extra="forbid")


@dataclass(frozen=True, config=_CONFIG)
class SamplingParams:
    """How to sample one request's output.

    temperature below GREEDY_BELOW (0 included) means greedy. top_k == 0 disables top-k; top_p == 1.0
    disables nucleus sampling. A request with a seed samples reproducibly:
    the same prompt, params and seed give the same tokens whatever the batch.
    """

    n: int = Field(1, ge=1)
    temperature: float = Field(1.0, ge=0.0, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    top_k: int = Field(0, ge=0)  # 0 disables it
    seed: int | None = None
    max_tokens: int = Field(16, ge=1)
    stop: tuple[Annotated[str, Field(min_length=1)], ...] = ()
    stop_token_ids: tuple[Annotated[int, Field(ge=0)], ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)  # the sampled token's logprob plus this many top alternatives

    @field_validator("stop", "stop_token_ids", mode="before")
    @classmethod
    def _as_tuple(cls, v: object) -> object:
        """Callers pass lists, one string or None; stored as tuples (hashable, immutable)."""
        if isinstance(v, str):
            return (v,)
        return tuple(v) if isinstance(v, list | tuple) else (() if v is None else v)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


@dataclass(frozen=True, config=_CONFIG)
class SLO:
    """One request's latency targets, in seconds: to its first token, and between its tokens.

    The "slo" scheduling policy orders waiting prompts by ttft_s deadline and sizes prefill chunks so
    that running decodes keep within itl_s (engine/scheduler.py)."""

    ttft_s: float = Field(gt=0.0, allow_inf_nan=False)
    itl_s: float = Field(gt=0.0, allow_inf_nan=False)


@dataclass(frozen=True, config=_CONFIG)
class EngineConfig:
    """One engine's resources and limits.

    Units: kv_cache_bytes in bytes (split into fixed blocks at start, never
    grown); gpu_memory_utilization a fraction of the GPU's total memory that
    the engine may fill (weights, activations and KV together); block_size,
    max_num_batched_tokens and max_model_len in tokens.
    num_kv_blocks, when set, overrides kv_cache_bytes (tests use it to force
    preemption with an exact block count).
    """

    model: str | None = None
    device: str = "auto"  # auto: CUDA when torch sees a GPU, else the CPU; also cpu, cuda, cuda:N, meta
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: bfloat16 on CUDA, else float32
    block_size: int = Field(16, ge=1)  # a power of two
    # The KV pool. None: 512 MiB on the CPU; on CUDA what gpu_memory_utilization leaves after the weights
    # and a profiled peak step. A byte count is taken as it is on any device.
    kv_cache_bytes: int | None = Field(None, gt=0)
    gpu_memory_utilization: float = Field(0.9, gt=0.0, le=1.0, allow_inf_nan=False)
    num_kv_blocks: int | None = Field(None, ge=1)
    max_num_seqs: int = Field(64, ge=1)
    max_num_batched_tokens: int = Field(2048, ge=1)
    max_model_len: int | None = Field(None, ge=1)  # default: the model's max_position_embeddings
    enable_prefix_caching: bool = True
    # auto: triton on CUDA, else cpu, else torch
    attention_backend: Literal["auto", "torch", "cpu", "triton"] = "auto"
    # Linear layers: "onednn" packs CPU weights once for oneDNN, q/k/v and gate/up fused (engine/cpu_linear.py),
    # and runs RMSNorms as one call (engine/cpu_norm.py); auto: onednn where it applies (CPU, float32 or
    # bfloat16), else the model's own modules as transformers built them.
    linear_backend: Literal["auto", "torch", "onednn"] = "auto"
    # "contiguous": one growing region of consecutive blocks per request, the
    # incident's allocator, kept to measure against (engine/contiguous_kv_cache_manager.py).
    kv_layout: Literal["paged", "contiguous"] = "paged"
    contiguous_reserve: Literal["grow", "max"] = "grow"  # contiguous: grow while decoding, or reserve max at once
    # "fcfs": waiting prompts in arrival order, the newest running request preempted. "slo": the earliest
    # time-to-first-token deadline first, prefill chunks sized so running decodes keep their ITL target, the
    # request with the most ITL slack preempted (requests carry an SLO; engine/scheduler.py).
    scheduling: Literal["fcfs", "slo"] = "fcfs"
    # Admission keeps free the blocks each running request needs for its next kv_watermark_tokens tokens
    # (at most to its max_tokens), so a new prompt does not force a running one out soon after. 0: admit
    # on the prompt's blocks alone.
    kv_watermark_tokens: int = Field(0, ge=0)
    # Host memory (bytes) for the KV of preempted requests: a preempted request's blocks are copied there and
    # written back when it runs again, instead of recomputed, when the measured copy costs less than the
    # measured recompute (engine/swap_space.py). 0: preemption always recomputes. Paged layout only.
    swap_space_bytes: int = Field(0, ge=0)
    num_threads: int | None = Field(None, ge=1)  # torch intra-op threads; None leaves torch's default
    # False: on CUDA with the Triton kernels, decode-only steps replay CUDA graphs captured per batch size
    # (engine/cuda_graphs.py). True by default until a GPU run has checked them; elsewhere always eager.
    enforce_eager: bool = True
    seed: int = 0

    @classmethod
    def coerce(cls, value: EngineConfig | dict | None) -> EngineConfig:
        """An EngineConfig from itself, a dict of its fields (config files, Ray args) or None (defaults)."""
        return value if isinstance(value, cls) else cls(**(value or {}))

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        return check_device_name(v)

    def __post_init__(self) -> None:
        _check(self.block_size & (self.block_size - 1) == 0,
               f"block_size must be a power of two >= 1, got {self.block_size}")
        _check(self.kv_layout != "contiguous" or not self.enable_prefix_caching,
               "kv_layout='contiguous' gives each request its own region, so cached prefix blocks cannot be "
               "shared: set enable_prefix_caching=False")
        _check(self.kv_layout == "paged" or not self.swap_space_bytes,
               "swap_space_bytes needs kv_layout='paged' (a contiguous region is re-reserved, not swapped)")


def error_message(exc: ValueError) -> str:
    """One line for a configuration or sampling error: `field: message` of pydantic's first error."""
    errors = exc.errors() if isinstance(exc, ValidationError) else None
    if not errors:
        return str(exc)
    first = errors[0]
    field = ".".join(str(p) for p in first.get("loc", ()))
    return f"{field}: {first['msg']}" if field else first["msg"].removeprefix("Value error, ")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)

"""What callers get back: vLLM-shaped RequestOutput / CompletionOutput, engine statistics, and what the
engine tells a worker: its fixed facts, its load, a finished prefill's export."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from engine.kv_cache import KVLayout


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None  # "stop", "length", "abort", "error" or None while running
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    logprobs: list[dict[int, float]] | None = None  # per output token, when asked for


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    num_cached_tokens: int  # prompt tokens taken from the prefix cache
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = False


@dataclass(frozen=True)
class EngineStats:
    """A snapshot; counters are cumulative since the engine started. Token counts in tokens."""

    num_blocks_total: int
    num_blocks_free: int
    kv_cache_usage: float  # fraction of blocks held by requests
    num_requests_running: int
    num_requests_waiting: int
    num_requests_deferred: int  # added with defer=True, waiting for KV from elsewhere
    num_requests_held: int  # finished, blocks kept for export (hold_kv)
    prefix_cache_queries: int
    prefix_cache_hits: int
    prompt_tokens_computed: int
    prompt_tokens_cached: int
    num_preemptions: int
    num_generated_tokens: int
    num_swap_outs: int = 0  # preemptions that copied the request's KV to host memory instead of dropping it
    num_request_errors: int = 0  # requests ended by a failure of their own step work (finish_reason "error")
    # KV layout health, the incident's symptoms (see engine/scheduler.py); the
    # move counters stay 0 for the paged layout, which never moves KV.
    num_admission_failures: int = 0  # times the head waiting request was refused KV room
    num_admission_failures_free_memory: int = 0  # ... while >= 25% of KV blocks were free
    num_growth_failures: int = 0  # times a running request found no room to grow (then preemption)
    num_kv_moves: int = 0  # contiguous regions moved to a larger hole
    kv_bytes_moved: int = 0  # bytes of filled KV copied by those moves
    kv_move_seconds: float = 0.0  # time spent copying them
    largest_free_hole_blocks: int = 0  # most blocks one new request could get now (paged: all free blocks)
    # What predicts latency misses (autoscaling signals): prompt tokens queued and not computed yet, and the
    # recent duration of a step that decoded (a decoding request's inter-token latency), seconds (0: none yet).
    num_waiting_prompt_tokens: int = 0
    recent_decode_step_s: float = 0.0


@dataclass(frozen=True)
class EngineInfo:
    """What never changes once an engine is built: safe to read from any thread."""

    block_size: int  # tokens per KV block
    layout: KVLayout  # the shape and dtype KV blocks have here, for export and import
    kv_dtype: torch.dtype  # the KV pool's element type (layout.dtype as a torch dtype)


@dataclass(frozen=True)
class EngineLoad:
    """How full an engine is now (for routing): plain reads, possibly a step stale."""

    kv_free_blocks: int
    kv_usage: float  # fraction of KV blocks held by requests
    num_waiting: int  # requests queued, not yet admitted
    prompt_token_s: float | None = None  # the learned cost of one prompt token in a step, seconds (None: unknown)


@dataclass(frozen=True)
class PrefillExport:
    """A finished prefill, handed over by Engine.finish_prefill: what another engine needs to continue it.

    blocks: a copy of the prompt's KV blocks [first_block, ...), shaped [num_layers, 2, n, block_size, Hkv, D],
    holding num_tokens tokens (the last block may be partial). block_hashes: every full prompt block's hash
    from block 0 (the directory is offered a prefix of them; the export carries those from first_block on).
    sampler_state: a seeded request's random state after the first token (None: the seed restores it).
    """

    blocks: torch.Tensor
    first_block: int
    num_tokens: int
    block_hashes: list[bytes]
    first_token: int
    first_logprobs: dict[int, float] | None
    sampler_state: bytes | None

"""What callers get back: vLLM-shaped RequestOutput / CompletionOutput, and engine statistics."""

from __future__ import annotations

from dataclasses import dataclass, field


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

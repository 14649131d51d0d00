"""Where a request's uncached prompt is computed: on this decode engine, or on a prefill worker.

Disaggregation pays a fixed price per request (a call to a prefill replica, an export, a fetch, an
import) to keep long prompts off the decode engine's steps. A 30-token follow-up is cheaper to compute
here than that price. Per request, a prompt whose uncached part is at most max_local_tokens is computed
here when its estimated cost here (tokens x this engine's learned prompt-token cost) is at most the
remote path's measured fixed cost:

    overhead_s = (wall time of the prefill call - the prefill worker's own time) + the KV fetch's time

Both estimates are moving averages (ALPHA); until both are known, the size bound alone decides, so the
first short prompts teach this engine its prompt cost and the first long ones the remote overhead.
max_local_tokens = 0 turns local prefills off (always disaggregated).
"""

from __future__ import annotations

ALPHA = 0.2  # weight of the newest observation


class PrefillPlacement:
    def __init__(self, max_local_tokens: int) -> None:
        if max_local_tokens < 0:
            raise ValueError(f"max_local_tokens must be >= 0, got {max_local_tokens}")
        self.max_local_tokens = max_local_tokens
        self.overhead_s: float | None = None  # the remote path's fixed cost, seconds

    def here(self, uncached_tokens: int, local_token_s: float | None) -> bool:
        """True to compute uncached_tokens prompt tokens on this engine, whose prompt tokens cost
        local_token_s seconds each (None: not measured yet)."""
        if uncached_tokens > self.max_local_tokens:
            return False
        if self.overhead_s is None or local_token_s is None:
            return True
        return uncached_tokens * local_token_s <= self.overhead_s

    def observe_remote(self, call_s: float, prefill_s: float, fetch_s: float) -> None:
        """One remote prefill: the call's wall time, the prefill worker's own time inside it and the KV
        fetch's time, seconds."""
        overhead = max(0.0, call_s - prefill_s) + fetch_s
        self.overhead_s = overhead if self.overhead_s is None else (1 - ALPHA) * self.overhead_s + ALPHA * overhead

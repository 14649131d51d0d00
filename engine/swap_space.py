"""SwapSpace: host memory for the KV of preempted requests, and the choice between swapping and recomputing.

A preempted request either drops its KV and recomputes it when it runs again (its prompt and the tokens it
generated), or has its blocks copied to host memory and written back into fresh blocks then (the copy
rides the same path as KV imported from a prefill worker). Which costs less depends on the hardware:
- recompute: tokens x the per-token prefill time the engine measures (StepCost.per_token_s);
- swap: twice the bytes (out, then back in) at the copy rate measured on earlier swaps.
Swap is chosen when it is cheaper, or while either cost is unknown (the first swap teaches the copy rate),
and only while the host space holds the request's blocks.

Invariants: used_bytes == the sum of the reservations of the requests swapped out and not yet written back
or ended; used_bytes <= capacity_bytes. Bytes and seconds throughout.
"""

from __future__ import annotations

from engine.step_cost import ALPHA, StepCost


class SwapSpace:
    def __init__(self, capacity_bytes: int) -> None:
        """capacity_bytes: host memory for swapped-out KV; 0 disables swapping (preemption recomputes)."""
        self.capacity_bytes = capacity_bytes
        self.used_bytes = 0
        self.copy_bytes_per_s: float | None = None  # learned from swap-outs
        self.num_swap_outs = 0

    def choose_swap(self, num_tokens: int, nbytes: int, cost: StepCost) -> bool:
        """Whether to swap out a request whose KV holds num_tokens computed tokens in nbytes of blocks (and
        reserve the space if so), rather than recompute them later."""
        if num_tokens == 0 or self.used_bytes + nbytes > self.capacity_bytes:
            return False
        if self.copy_bytes_per_s is not None and cost.per_token_s is not None:
            if 2 * nbytes / self.copy_bytes_per_s >= num_tokens * cost.per_token_s:
                return False
        self.used_bytes += nbytes
        self.num_swap_outs += 1
        return True

    def observe_copy(self, nbytes: int, seconds: float) -> None:
        """One swap-out copied nbytes in `seconds`."""
        rate = nbytes / max(seconds, 1e-9)
        old = self.copy_bytes_per_s
        self.copy_bytes_per_s = rate if old is None else (1 - ALPHA) * old + ALPHA * rate

    def release(self, nbytes: int) -> None:
        """A swapped-out request's KV was written back, or the request ended while swapped out."""
        self.used_bytes -= nbytes

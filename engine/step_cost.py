"""What a step costs, learned from the steps the engine ran: the "slo" policy's model for chunk sizes.

A step's duration (seconds) is modelled as base + per_token x prefill_tokens:
- base_s: a decode-only step of the batch as it is now (moving averages of such steps);
- per_token_s: each prompt token added to a step (from mixed or prefill-only steps, after
  subtracting base_s when the step also decoded).
Both are exponentially weighted (ALPHA), so the model follows the batch as it grows and shrinks.
Until a kind of step has been seen its estimate is None, and the budget is not limited by it:
the first prompt runs unrestricted and teaches the model its cost.
"""

from __future__ import annotations

ALPHA = 0.2  # weight of the newest observation
MIN_PER_TOKEN_S = 1e-9  # a floor: timer noise must not make prompt tokens look free


class StepCost:
    def __init__(self) -> None:
        self.base_s: float | None = None
        self.per_token_s: float | None = None
        self.decode_step_s: float | None = None  # any step that decoded: what decoding requests wait per token

    def observe(self, num_decodes: int, prefill_tokens: int, seconds: float) -> None:
        """One step that ran num_decodes one-token decodes and prefill_tokens prompt tokens in `seconds`."""
        if num_decodes:
            self.decode_step_s = _mix(self.decode_step_s, seconds)
        if prefill_tokens == 0:
            if num_decodes:
                self.base_s = _mix(self.base_s, seconds)
            return
        fixed = self.base_s if num_decodes and self.base_s is not None else 0.0
        self.per_token_s = _mix(self.per_token_s, max((seconds - fixed) / prefill_tokens, MIN_PER_TOKEN_S))

    def prefill_budget(self, step_s: float) -> int | None:
        """Prompt tokens a step can take and still last at most step_s seconds (0 if even its decodes take
        longer); None while the model has not seen a step with prompt tokens."""
        if self.per_token_s is None:
            return None
        return max(0, int((step_s - (self.base_s or 0.0)) / self.per_token_s))


def _mix(old: float | None, new: float) -> float:
    return new if old is None else (1 - ALPHA) * old + ALPHA * new

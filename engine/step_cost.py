"""What a step costs, learned from the steps the engine ran: the "slo" policy's model for chunk sizes.

A step's duration (seconds) is modelled as base + per_token x prefill_tokens:
- base_s: a decode-only step of the batch as it is now (moving averages of such steps);
- per_token_s: each prompt token added to a step (from mixed or prefill-only steps, after
  subtracting what the step pays anyway: base_s when it also decoded, else prompt_fixed_s);
- prompt_fixed_s: what a prompt-only step pays whatever its size (the layers' launch and Python cost),
  the intercept of a line fitted to prompt-only steps' durations against their sizes. Without it a
  step of a few uncached tokens would teach a per-token cost several times the real one (on this
  project's CPU, 8 tokens take 45 ms and 512 take 1 s);
- the decode line: a step's decode part (its duration less its prompt tokens' cost) against its number
  of decodes. With the rate prompt tokens arrive at, it says how many decoding requests fit an ITL
  target (decode_seats).
All are exponentially weighted, so the model follows the batch as it grows and shrinks.
Until a kind of step has been seen its estimate is None, and the budget is not limited by it:
the first prompt runs unrestricted and teaches the model its cost.
"""

from __future__ import annotations

ALPHA = 0.2  # weight of the newest observation
FIT_ALPHA = 0.05  # the line fit's: it needs steps of several sizes in its memory to tell slope from intercept
MIN_PER_TOKEN_S = 1e-9  # a floor: timer noise must not make prompt tokens look free


class StepCost:
    def __init__(self) -> None:
        self.base_s: float | None = None
        self.per_token_s: float | None = None
        self.decode_step_s: float | None = None  # any step that decoded: what decoding requests wait per token
        self._prompt_steps = _LineFit()  # prompt-only steps: seconds against prompt tokens
        self._decode_steps = _LineFit()  # steps that decoded: their decode part's seconds against decodes

    @property
    def prompt_fixed_s(self) -> float:
        """Seconds a prompt-only step takes beyond its tokens' cost (0.0 until steps of several sizes were seen)."""
        line = self._prompt_steps.line()
        return 0.0 if line is None else line[0]

    def observe(self, num_decodes: int, prefill_tokens: int, seconds: float) -> None:
        """One step that ran num_decodes one-token decodes and prefill_tokens prompt tokens in `seconds`."""
        self._observe_prompt(num_decodes, prefill_tokens, seconds)
        if num_decodes:
            self.decode_step_s = _mix(self.decode_step_s, seconds)
            if prefill_tokens == 0 or self.per_token_s is not None:
                prompt_s = min(seconds, prefill_tokens * (self.per_token_s or 0.0))
                self._decode_steps.add(num_decodes, seconds - prompt_s)

    def _observe_prompt(self, num_decodes: int, prefill_tokens: int, seconds: float) -> None:
        """base_s from a decode-only step; per_token_s (and prompt-only steps' line) from one with prompt tokens."""
        if prefill_tokens == 0:
            if num_decodes:
                self.base_s = _mix(self.base_s, seconds)
            return
        if num_decodes:
            fixed = self.base_s or 0.0
        else:
            self._prompt_steps.add(prefill_tokens, seconds)
            fixed = min(self.prompt_fixed_s, seconds)
        self.per_token_s = _mix(self.per_token_s, max((seconds - fixed) / prefill_tokens, MIN_PER_TOKEN_S))

    def decode_seats(self, itl_s: float, prompt_tokens_per_s: float) -> int | None:
        """How many requests can decode together while each one's mean time per output token stays within
        itl_s seconds, with prompt tokens arriving at prompt_tokens_per_s. A request decodes once a step, so
        its mean gap is the mean step: the decode part (intercept + slope x decodes) stretched by the share
        of time the prompts need (share = prompt_tokens_per_s x per_token_s):
        (intercept + slope x seats) / (1 - share) <= itl_s. None before a step that decoded was timed."""
        line = self._decode_steps.line()
        if line is None:
            return None
        intercept, slope = line
        share = min(1.0, prompt_tokens_per_s * (self.per_token_s or 0.0))
        room = (1.0 - share) * itl_s - intercept
        return max(0, int(room / max(slope, MIN_PER_TOKEN_S)))

    def prefill_budget(self, step_s: float) -> int | None:
        """Prompt tokens a step can take and still last at most step_s seconds (0 if even its decodes take
        longer); None while the model has not seen a step with prompt tokens."""
        if self.per_token_s is None:
            return None
        return max(0, int((step_s - (self.base_s or 0.0)) / self.per_token_s))


def _mix(old: float | None, new: float) -> float:
    return new if old is None else (1 - ALPHA) * old + ALPHA * new


class _LineFit:
    """y = intercept + slope x by exponentially weighted least squares (FIT_ALPHA per point)."""

    def __init__(self) -> None:
        self.n = 0
        self.mx = self.my = self.mxx = self.mxy = 0.0  # weighted means of x, y, x^2, xy

    def add(self, x: float, y: float) -> None:
        w = 1.0 if self.n == 0 else FIT_ALPHA
        self.n += 1
        self.mx += w * (x - self.mx)
        self.my += w * (y - self.my)
        self.mxx += w * (x * x - self.mxx)
        self.mxy += w * (x * y - self.mxy)

    def line(self) -> tuple[float, float] | None:
        """(intercept, slope) of the fit, the intercept >= 0; the line through the origin and the mean point
        while the points' x barely vary (no line to fit) or the fit's intercept would be negative. None
        before the first point."""
        if self.n == 0:
            return None
        through_origin = (0.0, self.my / self.mx if self.mx else 0.0)
        var = self.mxx - self.mx * self.mx
        if self.n < 2 or var <= (0.1 * self.mx) ** 2:
            return through_origin
        slope = (self.mxy - self.mx * self.my) / var
        intercept = self.my - slope * self.mx
        return through_origin if intercept < 0 else (intercept, slope)

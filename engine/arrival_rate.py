"""An exponentially decaying rate of arrivals: how much work (e.g. prompt tokens) comes in per second.

Each arrival of `amount` at time t adds amount / tau_s to the rate, and the rate decays by exp(-dt / tau_s)
as time passes, so it is a moving average over about the last tau_s seconds, with arrivals of any spacing.
Times are time.monotonic() seconds.
"""

from __future__ import annotations

import math
import time


class ArrivalRate:
    def __init__(self, tau_s: float) -> None:
        self.tau_s = tau_s
        self._rate = 0.0
        self._at: float | None = None

    def add(self, amount: float, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self._rate = self.per_s(now) + amount / self.tau_s
        self._at = now

    def per_s(self, now: float | None = None) -> float:
        """The rate at `now` (default: the current time), in amount per second; 0.0 before any arrival."""
        if self._at is None:
            return 0.0
        now = time.monotonic() if now is None else now
        return self._rate * math.exp(-max(0.0, now - self._at) / self.tau_s)

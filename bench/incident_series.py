"""What `pdserve incident` records for one KV configuration, on the real engine or in the GPU simulation.

A run is a time series of `Sample`s (one per engine step, or per simulated
tick) plus inter-token latency observations, and a summary computed from them
in one place (`summarize`), so the replay and the simulation report the same
numbers the same way. Units: seconds, blocks, tokens.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

FREE_FRACTION = 0.25  # "while at least a quarter of memory is free" (the incident); same as engine/scheduler.py


@dataclass(frozen=True)
class Sample:
    """The KV arena and the queues at time t (seconds since the run started), after a step or tick."""

    t: float
    free_blocks: int
    largest_hole: int  # blocks: the largest allocation that could succeed now (paged: every free block)
    running: int
    waiting: int
    tokens_held: int  # token slots holding KV of live sequences (a shared prefix counted once)
    tokens_reserved: int  # token slots of blocks owned by sequences or the shared prefix, filled or not
    refusals_free: int  # cumulative admission refusals while >= FREE_FRACTION of blocks were free


@dataclass
class Run:
    """One configuration's measurements; `counters` holds totals read at the end (refusals, moves, ...)."""

    name: str
    num_blocks: int
    block_size: int  # tokens per block
    bytes_per_token: int  # KV bytes of one token over all layers (K and V)
    samples: list[Sample] = field(default_factory=list)
    itl: list[tuple[float, float, int]] = field(default_factory=list)  # (t, seconds between tokens, count)
    counters: dict[str, float] = field(default_factory=dict)


def weighted_quantile(values: Sequence[tuple[float, int]], q: float) -> float:
    """The q-quantile (0..1) of values given as (value, count); nan when empty."""
    total = sum(n for _, n in values)
    if total == 0:
        return math.nan
    rank = q * total
    seen = 0
    for value, n in sorted(values):
        seen += n
        if seen >= rank:
            return value
    return max(v for v, _ in values)


def itl_over_time(run: Run, window_s: float, q: float = 0.99) -> list[tuple[float, float]]:
    """(window start, q-quantile of inter-token latency in that window), for windows with tokens."""
    buckets: dict[int, list[tuple[float, int]]] = {}
    for t, seconds, n in run.itl:
        buckets.setdefault(int(t // window_s), []).append((seconds, n))
    return [(k * window_s, weighted_quantile(v, q)) for k, v in sorted(buckets.items())]


def summarize(run: Run) -> dict[str, float]:
    """Peak and mean concurrency, KV use (held vs reserved), fragmentation and latency, plus the counters."""
    busy = [s for s in run.samples if s.running] or run.samples
    itl = [(seconds, n) for _, seconds, n in run.itl]
    held = sum(s.tokens_held for s in busy)
    reserved = sum(s.tokens_reserved for s in busy)
    arena = run.num_blocks
    stuck = [s for s in run.samples if s.waiting and s.free_blocks >= FREE_FRACTION * arena]
    return {
        "peak_running": max((s.running for s in run.samples), default=0),
        "mean_running": sum(s.running for s in busy) / max(len(busy), 1),
        "peak_waiting": max((s.waiting for s in run.samples), default=0),
        "kv_held_over_reserved": held / reserved if reserved else math.nan,
        "mean_reserved_fraction": sum(s.tokens_reserved for s in busy) / max(len(busy), 1) / (arena * run.block_size),
        "mean_free_fraction": sum(s.free_blocks for s in busy) / max(len(busy), 1) / arena,
        "mean_largest_hole_fraction": sum(s.largest_hole for s in busy) / max(len(busy), 1) / arena,
        "samples_waiting_with_free_memory": len(stuck) / max(len(run.samples), 1),
        "itl_p50_s": weighted_quantile(itl, 0.50),
        "itl_p99_s": weighted_quantile(itl, 0.99),
        "duration_s": run.samples[-1].t if run.samples else 0.0,
        **run.counters,
    }


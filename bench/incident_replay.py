"""The incident on the real engine: the seeded mix replayed against each KV layout, step by step.

Every layout gets the same requests (bench/workload.offline_mix, lengths
scaled for the CPU, greedy with ignore_eos so each request produces exactly
its max_tokens), the same arrival steps (Poisson in engine steps, from its
own seeded stream), the same KV arena (num_kv_blocks) and the same
scheduler limits; prefix caching is off everywhere (the contiguous layout
cannot share blocks; the GPU simulation covers prefix caching).

Arrivals are counted in engine steps, not wall time, so the scheduling (and
every counter) is deterministic whatever the machine's load; latency is
measured: a request's inter-token latency is the engine time (sum of measured
step times, copy stalls included) between two of its tokens, so a preemption
shows as one long gap.
"""

from __future__ import annotations

import hashlib
import random
import time
from dataclasses import dataclass
from typing import Any

from bench.incident_series import Run, Sample
from bench.workload import REPORT_GEN, SUPPORT_CHAT, WorkloadRequest, offline_mix
from engine.config import EngineConfig, SamplingParams
from engine.engine import Engine

LAYOUTS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("paged", {"kv_layout": "paged"}),
    ("contiguous (grow)", {"kv_layout": "contiguous", "contiguous_reserve": "grow"}),
    ("contiguous (reserve max)", {"kv_layout": "contiguous", "contiguous_reserve": "max"}),
)
COUNTERS = {  # our name -> EngineStats field
    "refusals": "num_admission_failures",
    "refusals_free_memory": "num_admission_failures_free_memory",
    "growth_failures": "num_growth_failures",
    "preemptions": "num_preemptions",
    "moves": "num_kv_moves",
    "bytes_moved": "kv_bytes_moved",
    "move_seconds": "kv_move_seconds",
    "generated_tokens": "num_generated_tokens",
    "prompt_tokens_computed": "prompt_tokens_computed",
}


@dataclass(frozen=True)
class ReplayConfig:
    """Workload and engine sizes of the replay. Lengths in tokens; rate in requests per engine step."""

    num_requests: int = 240
    seed: int = 0
    scale: float = 0.25  # of the workload's lengths (bench/workload.py): 55-token system prompt, outputs 12 and 375
    rate_per_step: float = 0.1
    num_kv_blocks: int = 256
    block_size: int = 16
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 512
    model: str | None = None  # None: the built-in tiny model
    num_threads: int = 1


def make_workload(config: ReplayConfig, vocab_size: int) -> tuple[list[WorkloadRequest], list[int]]:
    """The requests and the engine step at which each arrives (Poisson, mean gap 1 / rate_per_step)."""
    requests = offline_mix(config.num_requests, config.seed, vocab_size,
                           outputs={SUPPORT_CHAT: 50, REPORT_GEN: 1500}, scale=config.scale)
    gaps = random.Random(f"{config.seed}:arrival-steps")
    steps, t = [], 0.0
    for _ in requests:
        t += gaps.expovariate(config.rate_per_step)
        steps.append(int(t))
    return requests, steps


def replay(config: ReplayConfig, name: str, layout: dict[str, Any]) -> tuple[Run, str]:
    """One layout over the workload until every request ended. Returns its Run and a digest of all outputs."""
    engine = Engine(EngineConfig(model=config.model, num_kv_blocks=config.num_kv_blocks,
                                 block_size=config.block_size, max_num_seqs=config.max_num_seqs,
                                 max_num_batched_tokens=config.max_num_batched_tokens, enable_prefix_caching=False,
                                 num_threads=config.num_threads, **layout))
    requests, arrivals = make_workload(config, engine.vocab_size)
    run = Run(name, engine.kv_cache.num_blocks, config.block_size, engine.layout.bytes_per_block // config.block_size)
    last_token: dict[str, float] = {}
    outputs: dict[str, list[int]] = {}
    clock, step, nxt = 0.0, 0, 0
    while nxt < len(requests) or engine.has_unfinished_requests():
        if not engine.has_unfinished_requests():
            step = max(step, arrivals[nxt])  # idle: skip to the next arrival
        while nxt < len(requests) and arrivals[nxt] <= step:
            r = requests[nxt]
            engine.add_request(list(r.prompt_token_ids), SamplingParams(temperature=0.0, max_tokens=r.max_tokens,
                                                                        ignore_eos=True), request_id=r.request_id)
            nxt += 1
        begin = time.perf_counter()
        stepped = engine.step()
        clock += time.perf_counter() - begin
        for req in stepped:
            if req.request_id in last_token:
                run.itl.append((clock, clock - last_token[req.request_id], 1))
            last_token[req.request_id] = clock
            if req.is_finished:
                outputs[req.request_id] = req.output_token_ids
        run.samples.append(_sample(engine, clock, config.block_size))
        step += 1
    stats = engine.stats()
    run.counters.update({ours: float(getattr(stats, field)) for ours, field in COUNTERS.items()},
                        completed=len(outputs), steps=step, num_blocks=stats.num_blocks_total)
    return run, _digest(outputs)


def _sample(engine: Engine, clock: float, block_size: int) -> Sample:
    stats = engine.stats()
    return Sample(t=clock, free_blocks=stats.num_blocks_free, largest_hole=stats.largest_free_hole_blocks,
                  running=stats.num_requests_running, waiting=stats.num_requests_waiting,
                  tokens_held=sum(r.num_computed_tokens for r in engine.scheduler.running),
                  tokens_reserved=(stats.num_blocks_total - stats.num_blocks_free) * block_size,
                  refusals_free=stats.num_admission_failures_free_memory)


def _digest(outputs: dict[str, list[int]]) -> str:
    h = hashlib.sha256()
    for request_id in sorted(outputs):
        h.update(f"{request_id}:{outputs[request_id]};".encode())
    return h.hexdigest()[:16]


def replay_all(config: ReplayConfig) -> tuple[list[Run], bool]:
    """Every layout; also whether all produced the very same tokens (they must: greedy, same weights)."""
    results = [replay(config, name, layout) for name, layout in LAYOUTS]
    return [run for run, _ in results], len({digest for _, digest in results}) == 1

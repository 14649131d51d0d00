"""The incident at GPU scale: an hour of peak traffic through each KV allocator, simulated in pure Python.

What is simulated (GPUSpec, stated so anyone can redo the arithmetic):
- one 80 GB H100 SXM serving a Llama-3-8B-shaped model in fp16: weights
  8.03e9 params x 2 B = 16.06 GB; KV per token = 2 (K, V) x 32 layers x 8 KV
  heads x 128 head_dim x 2 B = 128 KiB; KV budget 60 GiB (80 GB minus weights
  minus ~4 GB of activations and runtime), in blocks of 16 tokens (2 MiB);
- decode is memory-bound: one step reads the weights once and the K/V of every
  context token of every decoding sequence, so
      step_s = weight_bytes / bw + context_tokens x 128 KiB / bw,
  with bw = 70% of the datasheet's 3.35 TB/s (H100 SXM datasheet; ~70% is
  what decode kernels typically reach) = 2.35 TB/s: a = 6.85 ms, b = 55.9 ns
  per context token; prefill is compute-bound: 2 x params FLOPs per prompt
  token at 50% of 989 dense bf16 TFLOPS = 32.5 us per token; moving a region
  copies its filled bytes device to device: 2 x bytes / bw (read + write);
- the allocators are the real ones: engine/contiguous_allocator.py (first fit,
  in-place growth, move with copy, the same sizing policies as the engine)
  and engine/block_pool.BlockPool for paged KV;
- the scheduler is the engine's: running sequences grow oldest first, a
  sequence that cannot grow preempts the newest running ones (recompute
  later), waiting requests are admitted first come first served while seats
  (max_num_seqs) and memory last, and a tick that preempted admits nobody;
- with prefix caching the shared system prompt's full blocks (220 tokens ->
  13 blocks = 208 tokens) are held once, pinned, and not recomputed; a
  contiguous request then holds only its own tokens in its region (its
  attention reads the shared prefix from the pinned region);
- "slo" scheduling follows the engine's policy (engine/scheduler.py) at tick
  granularity, against GPU-scale targets (SIM_SLOS): waiting requests by
  TTFT deadline (preempted ones first); a tick admits prompts only while its
  time per step stays within the smallest ITL target of the decoding
  sequences (at least one prompt per tick, so nothing starves); a stuck
  sequence preempts the one with the most ITL slack among those not grown
  yet this tick; with watermark_tokens, admission keeps free the blocks the
  running sequences need for that many more tokens.

Granularity: time advances in ticks of `block_size` decode steps. In a tick
every running sequence decodes up to 16 tokens (one block), newly admitted
ones are prefilled and get their first token; allocation decisions happen at
tick boundaries, where block-granular allocators make them anyway. Inter-token
latency of a tick's tokens is the tick's time over its steps (prefill and
copy stalls spread over them); a preempted sequence's next token adds one
observation: the whole gap since its previous token.

Traffic: bench/workload.offline_mix's two-product mix at full size (220-token
system prompt, user prompts 20..2,000 log-uniform, outputs 50 and 1,500, half
each), Poisson arrivals at a fixed peak rate, the same for every
configuration. Reserve-max reserves exactly prompt + output, which is the
most favourable case for that baseline (a real server reserves its max_tokens).
"""

from __future__ import annotations

import heapq
import math
import random
from collections import deque
from dataclasses import dataclass, field
from typing import Literal

from bench.incident_series import FREE_FRACTION, Run, Sample
from bench.workload import REPORT_GEN, SUPPORT_CHAT, offline_mix
from engine.block_pool import BlockPool, KVBlock
from engine.config import SLO
from engine.contiguous_allocator import (
    ContiguousAllocator,
    Growth,
    Region,
    Reserve,
    admission_size,
    grown_size,
)

GiB = 1 << 30
SYSTEM_PROMPT_TOKENS = 220
OUTPUTS = {SUPPORT_CHAT: 50, REPORT_GEN: 1500}
# Latency targets at GPU scale (the product files' targets are for the CPU): a chat answer starts within
# 1 s, a report within 3 s; both stream at 40 ms per token (25 tokens/s) or faster.
SIM_SLOS = {SUPPORT_CHAT: SLO(ttft_s=1.0, itl_s=0.04), REPORT_GEN: SLO(ttft_s=3.0, itl_s=0.04)}


@dataclass(frozen=True)
class GPUSpec:
    """The simulated GPU and model (see the module docstring for sources). Bytes, seconds, tokens."""

    kv_budget_bytes: int = 60 * GiB
    bytes_per_token: int = 2 * 32 * 8 * 128 * 2  # K and V x layers x KV heads x head_dim x fp16 = 128 KiB
    block_size: int = 16
    params: float = 8.03e9
    weight_bytes: float = 8.03e9 * 2
    memory_bandwidth: float = 3.35e12 * 0.70  # bytes/s achieved
    flops: float = 989e12 * 0.50  # FLOP/s achieved in prefill

    @property
    def num_blocks(self) -> int:
        return self.kv_budget_bytes // (self.bytes_per_token * self.block_size)

    def decode_s(self, steps: int, context_tokens_read: int) -> float:
        """Time of `steps` decode steps that together read `context_tokens_read` tokens of K/V."""
        return (steps * self.weight_bytes + context_tokens_read * self.bytes_per_token) / self.memory_bandwidth

    def prefill_s(self, tokens: int) -> float:
        return tokens * 2 * self.params / self.flops

    def copy_s(self, num_bytes: int) -> float:
        return 2 * num_bytes / self.memory_bandwidth


@dataclass(frozen=True)
class SimConfig:
    """One KV configuration; name is how the report labels it."""

    name: str
    layout: Literal["paged", "contiguous"]
    reserve: Reserve = "grow"
    prefix_caching: bool = False
    scheduling: Literal["fcfs", "slo"] = "fcfs"
    watermark_tokens: int = 0


CONFIGS = (
    SimConfig("contiguous (grow)", "contiguous", "grow"),
    SimConfig("contiguous (reserve max)", "contiguous", "max"),
    SimConfig("contiguous (grow) + prefix cache", "contiguous", "grow", prefix_caching=True),
    SimConfig("contiguous (reserve max) + prefix cache", "contiguous", "max", prefix_caching=True),
    SimConfig("paged", "paged"),
    SimConfig("paged + prefix cache", "paged", prefix_caching=True),
    SimConfig("paged + SLO scheduling", "paged", scheduling="slo"),
    SimConfig("paged + SLO scheduling + watermark", "paged", scheduling="slo", watermark_tokens=256),
    SimConfig("paged + prefix cache + SLO scheduling", "paged", prefix_caching=True, scheduling="slo"),
)


@dataclass(frozen=True)
class Traffic:
    """Peak-hour traffic: Poisson arrivals at rate_per_s for duration_s seconds (the run stops then)."""

    duration_s: float = 3600.0
    rate_per_s: float = 10.0
    seed: int = 0
    max_num_seqs: int = 1024  # large enough that memory, not the seat cap, limits concurrency
    max_prefill_tokens_per_step: int = 8192


@dataclass(frozen=True)
class SimRequest:
    arrival_s: float
    prompt_tokens: int
    output_tokens: int
    product: str = SUPPORT_CHAT

    @property
    def slo(self) -> SLO:
        return SIM_SLOS[self.product]


def make_requests(traffic: Traffic) -> list[SimRequest]:
    """Poisson arrivals over the run; lengths from offline_mix at full size (made in chunks: only lengths kept)."""
    gaps = random.Random(f"{traffic.seed}:arrivals")
    arrivals, t = [], gaps.expovariate(traffic.rate_per_s)
    while t < traffic.duration_s:
        arrivals.append(t)
        t += gaps.expovariate(traffic.rate_per_s)
    chunk, lengths = 2000, []
    for k in range(0, len(arrivals), chunk):
        mix = offline_mix(min(chunk, len(arrivals) - k), seed=traffic.seed * 1_000_003 + k, vocab_size=4,
                          system_prompt_tokens=SYSTEM_PROMPT_TOKENS, outputs=OUTPUTS)
        lengths.extend((r.prompt_len, r.max_tokens, r.product) for r in mix)
    return [SimRequest(a, *rest) for a, rest in zip(arrivals, lengths, strict=True)]


@dataclass(eq=False)
class _Seq:
    request: SimRequest
    generated: int = 0
    ctx: int = 0  # tokens whose K/V is in memory, a shared prefix included; 0 while waiting
    last_token_s: float | None = None

    @property
    def done(self) -> bool:
        return self.generated >= self.request.output_tokens

    @property
    def slack_key(self) -> tuple[float, float]:
        """Larger: preempted first under "slo" (the loosest ITL target, then the newest)."""
        return self.request.slo.itl_s, self.request.arrival_s

    @property
    def queue_key(self) -> tuple[bool, float]:
        """Smaller: admitted first under "slo" (preempted sequences, then the earliest TTFT deadline)."""
        return self.last_token_s is None, self.request.arrival_s + self.request.slo.ttft_s


class _PagedArena:
    """Paged KV over BlockPool: any free block serves any sequence."""

    def __init__(self, num_blocks: int, pinned_blocks: int) -> None:
        self.pool = BlockPool(num_blocks)
        self.pinned = self.pool.get_new_blocks(pinned_blocks)
        self.held: dict[_Seq, list[KVBlock]] = {}

    def ensure(self, seq: _Seq, need: int, known: int, filled: int, ceiling: int) -> int | None:
        """Give seq `need` blocks in all; None if the pool cannot (nothing changes). Returns blocks copied: 0."""
        blocks = self.held.get(seq, [])
        missing = need - len(blocks)
        if missing > 0:
            if missing > self.pool.num_free_blocks:
                return None
            self.held[seq] = blocks + self.pool.get_new_blocks(missing)
        return 0

    def release(self, seq: _Seq) -> None:
        self.pool.free_blocks(self.held.pop(seq, []))

    @property
    def free_blocks(self) -> int:
        return self.pool.num_free_blocks

    def largest_hole(self) -> int:
        return self.pool.num_free_blocks


class _ContiguousArena:
    """One region per sequence over ContiguousAllocator, sized like the engine's contiguous layout."""

    def __init__(self, num_blocks: int, pinned_blocks: int, reserve: Reserve) -> None:
        self.allocator = ContiguousAllocator(num_blocks)
        self.pinned = self.allocator.allocate(pinned_blocks) if pinned_blocks else None
        self.reserve = reserve
        self.regions: dict[_Seq, Region] = {}

    def ensure(self, seq: _Seq, need: int, known: int, filled: int, ceiling: int) -> int | None:
        """Make seq's region `need` blocks or more (admission: `known`, for its tokens and the next one,
        or the ceiling with reserve="max"); None if impossible. Returns blocks copied by a move."""
        region = self.regions.get(seq)
        if region is None:
            region = self.allocator.allocate(max(need, admission_size(known, ceiling, self.reserve)))
            if region is None:
                return None
            self.regions[seq] = region
            return 0
        if need <= region.length:
            return 0
        outcome = self.allocator.grow(region, need, grown_size(region.length, need, ceiling))
        if outcome is Growth.FAILED:
            return None
        return filled if outcome is Growth.MOVED else 0

    def release(self, seq: _Seq) -> None:
        region = self.regions.pop(seq, None)
        if region is not None:
            self.allocator.free(region)

    @property
    def free_blocks(self) -> int:
        return self.allocator.num_free

    def largest_hole(self) -> int:
        return self.allocator.largest_hole()


class _WaitQueue:
    """Waiting sequences in admission order: arrival order (preempted ones at the front) for "fcfs"; for
    "slo", _Seq.queue_key order, kept in a heap (under overload thousands wait, and each tick admits many)."""

    def __init__(self, scheduling: str) -> None:
        self._fifo: deque[_Seq] | None = deque() if scheduling == "fcfs" else None
        self._heap: list[tuple[tuple[bool, float], int, _Seq]] = []
        self._pushes = 0  # ties keep insertion order

    def __len__(self) -> int:
        return len(self._fifo) if self._fifo is not None else len(self._heap)

    def append(self, seq: _Seq) -> None:
        if self._fifo is not None:
            self._fifo.append(seq)
        else:
            self._pushes += 1
            heapq.heappush(self._heap, (seq.queue_key, self._pushes, seq))

    def push_front(self, seq: _Seq) -> None:
        """A preempted sequence: next in line for "fcfs"; "slo" orders it by its key (preempted first)."""
        if self._fifo is not None:
            self._fifo.appendleft(seq)
        else:
            self.append(seq)

    def peek(self) -> _Seq:
        return self._fifo[0] if self._fifo is not None else self._heap[0][2]

    def pop(self) -> _Seq:
        return self._fifo.popleft() if self._fifo is not None else heapq.heappop(self._heap)[2]


@dataclass
class _Tick:
    """What happened in one tick: admitted sequences, blocks copied by moves, prefill tokens computed."""

    admitted: list[_Seq] = field(default_factory=list)
    copied_blocks: int = 0
    prefill_tokens: int = 0
    preempted: bool = False


class Simulation:
    """One configuration over the traffic; `run()` returns its Run."""

    def __init__(self, config: SimConfig, gpu: GPUSpec, traffic: Traffic, requests: list[SimRequest]) -> None:
        self.config, self.gpu, self.traffic, self.requests = config, gpu, traffic, requests
        bs = gpu.block_size
        self.shared = (SYSTEM_PROMPT_TOKENS // bs) * bs if config.prefix_caching else 0  # tokens held once
        pinned = self.shared // bs
        self.arena = (_PagedArena(gpu.num_blocks, pinned) if config.layout == "paged"
                      else _ContiguousArena(gpu.num_blocks, pinned, config.reserve))
        self.waiting = _WaitQueue(config.scheduling)
        self.running: list[_Seq] = []
        self.run_data = Run(config.name, gpu.num_blocks, bs, gpu.bytes_per_token)
        self.counts = {"refusals": 0, "refusals_free_memory": 0, "growth_failures": 0, "preemptions": 0,
                       "moves": 0, "bytes_moved": 0, "move_seconds": 0.0, "completed": 0, "generated_tokens": 0,
                       "prompt_tokens_computed": 0}
        self.refused_free: set[int] = set()  # ids of requests refused at least once while memory was free
        self.free_at_refusal: list[float] = []  # fraction of blocks free at each refusal
        self.ttft: list[float] = []

    # ---- the loop -------------------------------------------------------------------------------------
    def run(self) -> Run:
        t, next_request = 0.0, 0
        while t < self.traffic.duration_s:
            while next_request < len(self.requests) and self.requests[next_request].arrival_s <= t:
                self.waiting.append(_Seq(self.requests[next_request]))
                next_request += 1
            tick = self._grow_running()
            if not tick.preempted:
                self._admit(tick)
            if not self.running:  # idle: jump to the next arrival
                t = self.requests[next_request].arrival_s if next_request < len(self.requests) else math.inf
                continue
            t = self._advance(t, tick)
            self._sample(t)
        self.run_data.counters.update(self.counts, requests_refused_free_memory=len(self.refused_free),
                                      ttft_p50_s=_quantile(self.ttft, 0.5), ttft_p99_s=_quantile(self.ttft, 0.99),
                                      arrived=next_request, still_waiting=len(self.waiting),
                                      largest_request_fraction=self._largest_request_fraction(),
                                      free_fraction_at_refusal_p50=_quantile(self.free_at_refusal, 0.5),
                                      free_fraction_at_refusal_max=max(self.free_at_refusal, default=math.nan))
        return self.run_data

    def _largest_request_fraction(self) -> float:
        """The largest request's whole footprint (prompt + output) as a fraction of the arena."""
        tokens = max((r.prompt_tokens + r.output_tokens for r in self.requests), default=0)
        return -(-tokens // self.gpu.block_size) / self.gpu.num_blocks

    def _own_blocks(self, tokens: int) -> int:
        """Blocks a sequence needs for `tokens` tokens of context, less the shared prefix held once."""
        return -(-(tokens - self.shared) // self.gpu.block_size)

    def _ensure(self, seq: _Seq, tokens: int) -> int | None:
        ceiling = self._own_blocks(seq.request.prompt_tokens + seq.request.output_tokens)
        filled = self._own_blocks(seq.ctx) if seq.ctx else 0
        return self.arena.ensure(seq, self._own_blocks(tokens), self._own_blocks(tokens + 1), filled, ceiling)

    def _grow_running(self) -> _Tick:
        """Room for this tick's tokens of every running sequence, oldest first; preempt newest when stuck."""
        tick, i = _Tick(), 0
        while i < len(self.running):
            seq = self.running[i]
            copied = self._ensure(seq, seq.ctx + self._tokens_this_tick(seq))
            if copied is None:
                self.counts["growth_failures"] += 1
                tick.preempted = True
                copied = self._preempt_for(seq)
                if copied is None:
                    continue  # seq itself was preempted
            tick.copied_blocks += copied
            self.counts["moves"] += int(copied > 0)
            i += 1
        return tick

    def _preempt_for(self, seq: _Seq) -> int | None:
        while True:
            victim = self._victim(seq)
            self.running.remove(victim)
            self.arena.release(victim)
            victim.ctx = 0
            self.waiting.push_front(victim)
            self.counts["preemptions"] += 1
            if victim is seq:
                return None
            copied = self._ensure(seq, seq.ctx + self._tokens_this_tick(seq))
            if copied is not None:
                return copied

    def _victim(self, seq: _Seq) -> _Seq:
        """fcfs: the newest running sequence. slo: the most slack among those not grown yet this tick
        (seq and the ones after it)."""
        if self.config.scheduling == "fcfs":
            return self.running[-1]
        return max(self.running[self.running.index(seq):], key=lambda s: s.slack_key)

    def _admit(self, tick: _Tick) -> None:
        budget = min(self.traffic.max_prefill_tokens_per_step * self.gpu.block_size, self._prompt_budget())
        while self.waiting and len(self.running) < self.traffic.max_num_seqs and tick.prefill_tokens < budget:
            seq = self.waiting.peek()
            tokens = seq.request.prompt_tokens + seq.generated
            over_budget = tick.prefill_tokens + tokens - self.shared > budget
            if self.config.scheduling == "slo" and tick.admitted and over_budget:
                return
            if self._over_watermark(tokens) or self._ensure(seq, tokens) is None:
                self._refused(seq)
                return
            self.waiting.pop()
            self.running.append(seq)
            tick.admitted.append(seq)
            tick.prefill_tokens += tokens - self.shared
            seq.ctx = tokens

    def _prompt_budget(self) -> float:
        """Prompt tokens this tick may add under "slo": what keeps each of its steps within the smallest ITL
        target of the decoding sequences (the engine learns this cost; here the GPU model gives it)."""
        if self.config.scheduling == "fcfs" or not self.running:
            return math.inf
        steps = self.gpu.block_size
        read = sum(steps * (s.ctx + steps // 2) for s in self.running)
        target = min(s.request.slo.itl_s for s in self.running)
        return max(0.0, (target * steps - self.gpu.decode_s(steps, read)) / self.gpu.prefill_s(1))

    def _over_watermark(self, tokens: int) -> bool:
        """Would admitting `tokens` more leave fewer free blocks than the running sequences' next
        watermark_tokens need?"""
        horizon = self.config.watermark_tokens
        if not horizon or not self.running:
            return False
        reserve = sum(max(0, self._own_blocks(min(s.ctx + horizon, s.request.prompt_tokens + s.request.output_tokens))
                             - self._own_blocks(s.ctx)) for s in self.running)
        return self.arena.free_blocks - self._own_blocks(tokens) < reserve

    def _refused(self, seq: _Seq) -> None:
        self.counts["refusals"] += 1
        self.free_at_refusal.append(self.arena.free_blocks / self.gpu.num_blocks)
        if self.arena.free_blocks >= FREE_FRACTION * self.gpu.num_blocks:
            self.counts["refusals_free_memory"] += 1
            self.refused_free.add(id(seq))

    def _tokens_this_tick(self, seq: _Seq) -> int:
        return min(self.gpu.block_size, seq.request.output_tokens - seq.generated)

    def _advance(self, t: float, tick: _Tick) -> float:
        """Time the tick, hand out its tokens, end finished sequences; returns the time at its end."""
        gpu, new = self.gpu, set(tick.admitted)
        decoding = [(s, self._tokens_this_tick(s)) for s in self.running if s not in new]
        steps = max((n for _, n in decoding), default=1)
        read = sum(n * (s.ctx + n // 2) for s, n in decoding)  # each step reads the context so far
        copy_bytes = tick.copied_blocks * gpu.block_size * gpu.bytes_per_token
        move_s = gpu.copy_s(copy_bytes)
        tick_s = gpu.decode_s(steps, read) + gpu.prefill_s(tick.prefill_tokens) + move_s
        end = t + tick_s
        self.counts["bytes_moved"] += copy_bytes
        self.counts["move_seconds"] += move_s
        self.counts["prompt_tokens_computed"] += tick.prefill_tokens
        decoded = 0
        for seq, n in decoding:
            seq.ctx += n
            seq.generated += n
            seq.last_token_s = end
            decoded += n
        if decoded:
            self.run_data.itl.append((end, tick_s / steps, decoded))
        for seq in tick.admitted:
            if seq.last_token_s is None:
                self.ttft.append(end - seq.request.arrival_s)
            else:  # resumed after preemption: its next token waited all this time
                self.run_data.itl.append((end, end - seq.last_token_s, 1))
            seq.generated += 1
            seq.last_token_s = end
        self.counts["generated_tokens"] += decoded + len(tick.admitted)
        self._finish_done()
        return end

    def _finish_done(self) -> None:
        still = []
        for seq in self.running:
            if seq.done:
                self.arena.release(seq)
                self.counts["completed"] += 1
            else:
                still.append(seq)
        self.running = still

    def _sample(self, t: float) -> None:
        bs = self.gpu.block_size
        free = self.arena.free_blocks
        held = sum(s.ctx - self.shared for s in self.running) + self.shared
        self.run_data.samples.append(Sample(
            t=t, free_blocks=free, largest_hole=self.arena.largest_hole(), running=len(self.running),
            waiting=len(self.waiting), tokens_held=held, tokens_reserved=(self.gpu.num_blocks - free) * bs,
            refusals_free=self.counts["refusals_free_memory"]))


def _quantile(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def simulate_all(traffic: Traffic, gpu: GPUSpec = GPUSpec(), configs: tuple[SimConfig, ...] = CONFIGS) -> list[Run]:
    """Every configuration over the same requests."""
    requests = make_requests(traffic)
    return [Simulation(c, gpu, traffic, requests).run() for c in configs]

"""Continuous batching: which requests run this step, and how many tokens each.

Each step has a token budget (max_num_batched_tokens) and a sequence cap
(max_num_seqs). Running requests go first, oldest first: a decode takes one
token, an unfinished prompt takes a chunk of what is left of the budget
(chunked prefill). When the pool has no block for a running request, the
newest running request is preempted: its blocks are freed and it goes back to
the front of the waiting queue to be recomputed later. Waiting requests are
admitted in arrival order while budget, seats and blocks last; a step that
preempted admits nobody. No request is dropped: max_model_len never exceeds
what the whole pool holds, so the oldest request can always finish alone.

The "slo" policy (EngineConfig.scheduling) changes three choices, from each
request's SLO (time to first token, inter-token latency):
- which prompt is next: a preempted one, else the earliest TTFT deadline,
  whether it waits or is part way through its chunks (a chat prompt does not
  queue behind a long report prompt, even one already started);
- how many prompt tokens a step takes: running decodes go first, and prompt
  chunks fill the step only up to the time every decoding request allows
  (Request.step_time_allowed: what keeps its mean time per output token, the
  SLO's ITL as the benchmarks judge it, within target, using the slack its
  faster earlier steps left, but at most MAX_GAP_TARGETS targets for one gap;
  a StepCost learned from past steps converts time into tokens), but at least
  one block's worth, so prompts always progress;
- whom to preempt: the request with the most ITL slack (the largest target,
  then the newest) among those not yet scheduled this step.
Either policy may keep a KV watermark: admission leaves free the blocks the
running requests need for their next kv_watermark_tokens tokens. With swap
space (engine/swap_space.py), a preempted request whose KV is cheaper to copy
to the host and back than to recompute is swapped out instead: the engine
copies its blocks before the step runs, and when it is admitted again they are
imported into fresh blocks like KV from a prefill worker.

Two checks refuse a new request at once (OverloadedError, nothing added), each when its caller asks:
its predicted time to first token is past a limit (check_ttft; a request that finds every seat taken waits
for running ones to end first; one whose own prompt takes longer than the limit on an idle engine is never
refused for it, as no retry would help), or more requests would decode here than a share of the seats
(max_num_seqs, or what the ITL targets allow when that is fewer: check_decode_seats).

The same rules hold for both KV layouts (paged and contiguous). Counted for
the incident's symptoms: each refusal of the head waiting request (and those
while at least FREE_MEMORY_FRACTION of the blocks were free), and each time a
running request found no room to grow (it led to preemption).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from typing import Literal

from engine.arrival_rate import ArrivalRate
from engine.contiguous_kv_cache_manager import ContiguousKVCacheManager
from engine.kv_cache_manager import KVCacheManager
from engine.request import Request, RequestStatus
from engine.step_cost import StepCost
from engine.swap_space import SwapSpace


class OverloadedError(Exception):
    """A request refused at once for load: it would miss its SLO, or crowd out requests that can meet theirs.
    retry_after_s: when the engine expects room for it (seconds). worker_id: the worker whose engine refused
    it, when that worker says so (another replica may have room)."""

    def __init__(self, reason: str, retry_after_s: float, worker_id: str | None = None) -> None:
        super().__init__(f"{reason}: the engine is overloaded")
        self.reason, self.retry_after_s, self.worker_id = reason, retry_after_s, worker_id

    def __reduce__(self) -> tuple:  # it crosses processes (a worker to the ingress): rebuilt from its fields
        return OverloadedError, (self.reason, self.retry_after_s, self.worker_id)


# The longest step the "slo" policy plans, in ITL targets of the decoding requests: slack earlier fast
# steps left lets a step take more prompt tokens (a long prompt's TTFT), but one gap stays bounded.
MAX_GAP_TARGETS = 4.0

# Seconds over which the rate prompt tokens arrive at is averaged (decode seats leave the prompts this time).
PROMPT_RATE_TAU_S = 20.0

# "Out of memory while a quarter of memory is free" (the incident, bench/incident.py): a refused
# admission with at least this fraction of KV blocks free is the incident's symptom.
FREE_MEMORY_FRACTION = 0.25


@dataclass
class SchedulerOutput:
    scheduled: list[tuple[Request, int]] = field(default_factory=list)  # decodes (1 token) first
    imports: list[tuple[Request, int]] = field(default_factory=list)  # (request, first block) to fill from pending_kv
    preempted: list[Request] = field(default_factory=list)
    swapped_out: list[Request] = field(default_factory=list)  # preempted ones whose swap_block_ids to copy now

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.scheduled)


class Scheduler:
    def __init__(self, kv: KVCacheManager | ContiguousKVCacheManager, max_num_seqs: int,
                 max_num_batched_tokens: int, policy: Literal["fcfs", "slo"] = "fcfs",
                 watermark_tokens: int = 0, swap_space_bytes: int = 0, block_bytes: int = 0) -> None:
        """swap_space_bytes: host memory for preempted requests' KV (0: recompute them); block_bytes: one KV
        block's bytes, all layers, K and V."""
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.policy = policy
        self.watermark_tokens = watermark_tokens
        self.cost = StepCost()  # the engine reports every step's duration here
        self.prompt_rate = ArrivalRate(PROMPT_RATE_TAU_S)  # uncached prompt tokens queued per second
        self.swap = SwapSpace(swap_space_bytes)  # the engine reports every swap-out's copy time here
        self.block_bytes = block_bytes
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0
        self.num_admission_failures = 0
        self.num_admission_failures_free_memory = 0  # refused while >= FREE_MEMORY_FRACTION of blocks were free
        self.num_growth_failures = 0

    def add(self, request: Request) -> None:
        request.expected_cached_tokens = self.kv.cached_prefix_tokens(request)
        self.prompt_rate.add(self._prompt_left(request))
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def num_waiting_prompt_tokens(self) -> int:
        """Prompt tokens still to compute: the waiting requests' (less what the prefix cache held of them when
        queued, or KV arrives for) and the rest of running prompts (chunked prefill)."""
        return sum(self._prompt_left(r) for r in (*self.waiting, *self.running))

    def predicted_ttft_s(self, request: Request) -> float | None:
        """Seconds until `request` (not queued yet) would have its first token. Counted: the prompt tokens
        computed before its own (the running prompts' rest and the waiting requests ahead of it: all under
        "fcfs", those preempted or with an earlier TTFT deadline under "slo") and its own, each less what the
        prefix cache holds. They run in steps of at most the prompt budget, each step costing its fixed part
        (the running decodes, else a prompt-only step's) plus the learned per-token cost. When every seat
        (max_num_seqs) would be taken, the wait for running requests to end comes first (_seconds_to_seats).
        None until a step with prompt tokens has been timed."""
        per_token_s = self.cost.per_token_s
        if per_token_s is None:
            return None
        request.expected_cached_tokens = self.kv.cached_prefix_tokens(request)
        key = self._waiting_key(request)
        ahead = [r for r in self.waiting if self.policy == "fcfs" or self._waiting_key(r) <= key]
        started = [r for r in self.running if self.policy == "fcfs" or self._waiting_key(r) <= key]
        tokens = sum(self._prompt_left(r) for r in (*started, *ahead)) + self._prompt_left(request)
        decodes = sum(1 for _ in self._decoding())
        per_step = self._prompt_budget() if self.policy == "slo" else self.max_num_batched_tokens - decodes
        fixed = self.cost.base_s if decodes and self.cost.base_s is not None else self.cost.prompt_fixed_s
        seat_wait_s = self._seconds_to_seats(len(self.running) + len(ahead) + 1 - self.max_num_seqs)
        return seat_wait_s + -(-tokens // max(per_step, 1)) * fixed + tokens * per_token_s

    def alone_ttft_s(self, request: Request) -> float | None:
        """Seconds until `request` (not queued yet) would have its first token on this engine idle: its own
        uncached prompt tokens in prompt-only steps of max_num_batched_tokens. None until a step with prompt
        tokens has been timed."""
        per_token_s = self.cost.per_token_s
        if per_token_s is None:
            return None
        request.expected_cached_tokens = self.kv.cached_prefix_tokens(request)
        tokens = self._prompt_left(request)
        return -(-tokens // self.max_num_batched_tokens) * self.cost.prompt_fixed_s + tokens * per_token_s

    def check_ttft(self, request: Request, limit_s: float) -> None:
        """Raise OverloadedError when `request`'s predicted time to first token (predicted_ttft_s) is past
        limit_s seconds because of the load ahead of it. A request that would pass the limit even on this
        engine idle (alone_ttft_s) is not refused for it: no retry would bring it within, so it is served,
        late. Nothing is checked before a step with prompt tokens was timed."""
        predicted = self.predicted_ttft_s(request)
        if predicted is None or predicted <= limit_s:
            return
        alone = self.alone_ttft_s(request)
        if alone is not None and alone > limit_s:
            return
        raise OverloadedError(f"predicted time to first token {predicted:.2f} s is past this request's limit "
                              f"of {limit_s:.2f} s", predicted - limit_s)

    def check_decode_seats(self, committed: Collection[Request], share: float) -> None:
        """Raise OverloadedError when the committed requests (every unfinished one on this engine and the new
        one: all decode soon) are more than `share` of the seats: the engine's max_num_seqs, or fewer where
        the tightest ITL target among them allows fewer (StepCost.decode_seats, leaving the prompts queued
        lately the time they need; known once a decoding step was timed). A share under 1 keeps seats for
        others: under overload, requests with a smaller share are refused first, and requests with the whole
        engine find a seat free instead of waiting for one to end."""
        targets = [r.slo.itl_s for r in committed if r.slo is not None]
        itl_seats = self.cost.decode_seats(min(targets), self.prompt_rate.per_s()) if targets else None
        seats = self.max_num_seqs if itl_seats is None else min(itl_seats, self.max_num_seqs)
        if len(committed) > share * seats:
            raise OverloadedError(f"{len(committed)} requests would decode where the ITL targets and max_num_seqs "
                                  f"allow {seats} and this request may fill {share:.0%} of them",
                                  self._seconds_to_seats(1))

    def _seconds_to_seats(self, needed: int) -> float:
        """Seconds until `needed` running requests have ended (0 for none): the needed-th fewest tokens left
        (each at most to its max_tokens, an upper bound: answers may stop sooner), at the recent decode step time."""
        if needed <= 0:
            return 0.0
        if not self.running:  # the seats are held by waiting requests: at least a step
            return self.cost.decode_step_s or 0.0
        left = sorted(r.sampling_params.max_tokens - r.num_output_tokens for r in self.running)
        return max(1, left[min(needed, len(left)) - 1]) * (self.cost.decode_step_s or 0.0)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        prompt_budget = self._prompt_budget()
        running, chunks = self._running_order()
        for req in running:
            if budget <= 0:
                break
            is_prompt = req.num_tokens - req.num_computed_tokens > 1
            n = self._continue(req, budget, prompt_budget, out)
            budget -= n
            prompt_budget -= n if is_prompt else 0
        admitting = True
        while min(budget, prompt_budget) > 0:
            admitting = (admitting and bool(self.waiting) and len(self.running) < self.max_num_seqs
                         and not out.preempted)  # a step that preempted admits nobody
            req = self._next_waiting() if admitting else None
            if chunks and (req is None or self._waiting_key(chunks[0]) <= self._waiting_key(req)):
                n = self._continue(chunks.pop(0), budget, prompt_budget, out)
            elif req is not None:
                n = self._admit(req, budget, prompt_budget, out)
                admitting = n is not None
                n = n or 0
            else:
                break
            budget -= n
            prompt_budget -= n
        out.scheduled.sort(key=lambda item: item[1] != 1)
        return out

    def _continue(self, req: Request, budget: int, prompt_budget: int, out: SchedulerOutput) -> int:
        """Schedule a running request's next tokens (a decode's one, a prompt's next chunk within the budgets),
        preempting others for room when the pool is short; the tokens scheduled (0: none)."""
        if req.status != RequestStatus.RUNNING:  # preempted this step to make room for another
            return 0
        left = req.num_tokens - req.num_computed_tokens
        n = min(left, budget) if left == 1 else min(left, budget, prompt_budget)
        if n > 0 and (self.kv.allocate_slots(req, n) or self._preempt_for(req, n, out)):
            out.scheduled.append((req, n))
            return n
        return 0

    def _admit(self, req: Request, budget: int, prompt_budget: int, out: SchedulerOutput) -> int | None:
        """Admit a waiting request with its first prompt chunk; the tokens scheduled, or None when the pool
        has no room for it (counted as a refusal)."""
        if req.block_table or req.pending_kv is not None:  # prefix already decided (Engine.add_request(defer))
            computed_blocks, num_cached = [], req.num_computed_tokens
        else:
            computed_blocks, num_cached = self.kv.get_computed_blocks(req)
        n_import = req.pending_kv_tokens if req.pending_kv is not None else 0
        n = min(req.num_tokens - num_cached - n_import, budget, prompt_budget)
        if not self.kv.allocate_slots(req, n_import + n, computed_blocks, reserve=self._watermark()):
            self._count_refusal()
            return None
        self.waiting.remove(req)
        if n_import:
            out.imports.append((req, num_cached // self.kv.block_size))
            self._release_swap(req, keep_kv=True)  # written back by this step
        req.num_computed_tokens = num_cached + n_import
        if req.num_cached_tokens < 0:
            req.num_cached_tokens = min(num_cached, req.num_prompt_tokens)
        req.status = RequestStatus.RUNNING
        self.running.append(req)
        out.scheduled.append((req, n))
        return n

    def finish(self, request: Request, status: RequestStatus, free: bool = True) -> None:
        """End a request (stopped, length or aborted); free its blocks unless the caller keeps them."""
        if request.status == RequestStatus.RUNNING:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        request.status = status
        self._release_swap(request)
        if free:
            self.kv.free(request)

    def _preempt_for(self, req: Request, n: int, out: SchedulerOutput) -> bool:
        """req (running) found no room for n more tokens: preempt others until it fits. Returns False when
        req itself had to be preempted."""
        self.num_growth_failures += 1
        while True:
            victim = self._victim(out)
            self.running.remove(victim)
            self._preempt(victim, out)
            out.preempted.append(victim)
            if victim is req:
                return False
            if self.kv.allocate_slots(req, n):
                return True

    def _victim(self, out: SchedulerOutput) -> Request:
        """fcfs: the newest running request. slo: the most ITL slack (largest target, then newest) among
        those not scheduled yet this step (the request that needs room is one of them)."""
        if self.policy == "fcfs":
            return self.running[-1]
        scheduled = {id(r) for r, _ in out.scheduled}
        return max((r for r in self.running if id(r) not in scheduled), key=lambda r: (r.itl_target, r.arrival_time))

    def _running_order(self) -> tuple[list[Request], list[Request]]:
        """The running requests scheduled before any waiting one, and the running prompts taken in turn with
        the waiting requests. fcfs: every running request first, oldest first. slo: the decodes first (oldest
        first); a running prompt's next chunk then competes with the waiting requests by TTFT deadline, so a
        chat that arrives while a long report prompt is part done goes before the report's next chunk."""
        if self.policy == "fcfs":
            return list(self.running), []
        decoding = list(self._decoding())
        chunks = sorted((r for r in self.running if r.num_tokens - r.num_computed_tokens > 1), key=self._waiting_key)
        return decoding, chunks

    def _next_waiting(self) -> Request:
        if self.policy == "fcfs":
            return self.waiting[0]
        return min(self.waiting, key=self._waiting_key)

    @staticmethod
    def _waiting_key(request: Request) -> tuple[bool, float]:
        """The "slo" order of prompts, waiting or started: preempted ones first, then by TTFT deadline."""
        return request.status != RequestStatus.PREEMPTED, request.ttft_deadline

    @staticmethod
    def _prompt_left(request: Request) -> int:
        """Prompt tokens the request still has to compute (0 for a decode): none that the prefix cache held
        when it was queued or that arrive as KV."""
        done = max(request.num_computed_tokens, request.expected_cached_tokens) + request.pending_kv_tokens
        left = request.num_tokens - done
        return left if left > 1 else 0

    def _prompt_budget(self) -> int:
        """Prompt tokens this step may take: under "slo", what keeps it within the time every decoding request
        allows (at least a block); otherwise the whole step budget."""
        if self.policy == "fcfs":
            return self.max_num_batched_tokens
        step_s = self._step_time_cap()
        allowed = self.cost.prefill_budget(step_s) if step_s != float("inf") else None
        return self.max_num_batched_tokens if allowed is None else max(allowed, self.kv.block_size)

    def _step_time_cap(self) -> float:
        """The least step time any request decoding now allows (Request.step_time_allowed; inf: none has an SLO)."""
        now = time.monotonic()
        return min((r.step_time_allowed(now, MAX_GAP_TARGETS) for r in self._decoding()), default=float("inf"))

    def _decoding(self) -> Iterator[Request]:
        """The running requests whose prompt is done: each takes one token a step."""
        return (r for r in self.running if r.num_tokens - r.num_computed_tokens == 1)

    def _watermark(self) -> int:
        """Blocks admission leaves free: what the running requests need for their next watermark_tokens."""
        if not self.watermark_tokens:
            return 0
        return sum(r.blocks_to_grow(self.kv.block_size, self.watermark_tokens) for r in self.running)

    def _count_refusal(self) -> None:
        self.num_admission_failures += 1
        if self.kv.num_free_blocks >= FREE_MEMORY_FRACTION * self.kv.num_blocks:
            self.num_admission_failures_free_memory += 1

    def _preempt(self, request: Request, out: SchedulerOutput) -> None:
        """Free a running request's blocks and queue it first; swap its KV out when that is cheaper than
        recomputing it (the engine copies swap_block_ids before this step's forward overwrites them)."""
        num_blocks = -(-request.num_computed_tokens // self.kv.block_size)
        nbytes = num_blocks * self.block_bytes
        if self.swap.choose_swap(request.num_computed_tokens, nbytes, self.cost):
            request.swap_block_ids = [b.block_id for b in request.block_table[:num_blocks]]
            request.swap_tokens, request.swap_bytes = request.num_computed_tokens, nbytes
            out.swapped_out.append(request)
        self.kv.free(request)
        request.num_computed_tokens = 0
        request.status = RequestStatus.PREEMPTED
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)

    def _release_swap(self, request: Request, keep_kv: bool = False) -> None:
        """A swapped-out request is written back (keep_kv: its pending_kv is this step's import) or ended."""
        if request.swap_bytes:
            self.swap.release(request.swap_bytes)
            request.swap_bytes = 0
            if not keep_kv:
                request.pending_kv, request.pending_kv_tokens, request.swap_block_ids = None, 0, None

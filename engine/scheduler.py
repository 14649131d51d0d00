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

The same rules hold for both KV layouts (paged and contiguous). Counted for
the incident's symptoms: each refusal of the head waiting request (and those
while at least FREE_MEMORY_FRACTION of the blocks were free), and each time a
running request found no room to grow (it led to preemption).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from engine.contiguous_kv_cache_manager import ContiguousKVCacheManager
from engine.kv_cache_manager import KVCacheManager
from engine.request import Request, RequestStatus

# "Out of memory while a quarter of memory is free" (the incident, bench/incident.py): a refused
# admission with at least this fraction of KV blocks free is the incident's symptom.
FREE_MEMORY_FRACTION = 0.25


@dataclass
class SchedulerOutput:
    scheduled: list[tuple[Request, int]] = field(default_factory=list)  # decodes (1 token) first
    imports: list[tuple[Request, int]] = field(default_factory=list)  # (request, first block) to fill from pending_kv
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.scheduled)


class Scheduler:
    def __init__(self, kv: KVCacheManager | ContiguousKVCacheManager, max_num_seqs: int,
                 max_num_batched_tokens: int) -> None:
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0
        self.num_admission_failures = 0
        self.num_admission_failures_free_memory = 0  # refused while >= FREE_MEMORY_FRACTION of blocks were free
        self.num_growth_failures = 0

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            if self.kv.allocate_slots(req, n) or self._preempt_for(req, n, out):
                out.scheduled.append((req, n))
                budget -= n
                i += 1
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not out.preempted:
            req = self.waiting[0]
            if req.block_table or req.pending_kv is not None:  # prefix already decided (Engine.add_request(defer))
                computed_blocks, num_cached = [], req.num_computed_tokens
            else:
                computed_blocks, num_cached = self.kv.get_computed_blocks(req)
            n_import = req.pending_kv_tokens if req.pending_kv is not None else 0
            n = min(req.num_tokens - num_cached - n_import, budget)
            if not self.kv.allocate_slots(req, n_import + n, computed_blocks):
                self._count_refusal()
                break
            self.waiting.popleft()
            if n_import:
                out.imports.append((req, num_cached // self.kv.block_size))
            req.num_computed_tokens = num_cached + n_import
            if req.num_cached_tokens < 0:
                req.num_cached_tokens = min(num_cached, req.num_prompt_tokens)
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            out.scheduled.append((req, n))
            budget -= n
        out.scheduled.sort(key=lambda item: item[1] != 1)
        return out

    def finish(self, request: Request, status: RequestStatus, free: bool = True) -> None:
        """End a request (stopped, length or aborted); free its blocks unless the caller keeps them."""
        if request.status == RequestStatus.RUNNING:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        request.status = status
        if free:
            self.kv.free(request)

    def _preempt_for(self, req: Request, n: int, out: SchedulerOutput) -> bool:
        """req (running) found no room for n more tokens: preempt the newest running requests until it
        fits. Returns False when req itself had to be preempted."""
        self.num_growth_failures += 1
        while True:
            victim = self.running.pop()
            self._preempt(victim)
            out.preempted.append(victim)
            if victim is req:
                return False
            if self.kv.allocate_slots(req, n):
                return True

    def _count_refusal(self) -> None:
        self.num_admission_failures += 1
        if self.kv.num_free_blocks >= FREE_MEMORY_FRACTION * self.kv.num_blocks:
            self.num_admission_failures_free_memory += 1

    def _preempt(self, request: Request) -> None:
        self.kv.free(request)
        request.num_computed_tokens = 0
        request.status = RequestStatus.PREEMPTED
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)

"""Engine.step(): schedule -> packed forward -> sample -> update. No Ray, no threads.

The engine owns the model, the paged KV cache, the block pool and the
scheduler. Callers add requests, call step() until nothing is unfinished, and
read each request's tokens. Every request that ends (stop, length, abort)
returns all its blocks to the pool in the same call.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from dataclasses import dataclass

import torch
from transformers import AutoTokenizer, GenerationConfig, PretrainedConfig

from engine import cpu_attention, cpu_linear, cpu_norm, memory_profile, models
from engine.block_hash import extra_keys
from engine.config import CPU_KV_CACHE_BYTES, SLO, EngineConfig, SamplingParams
from engine.contiguous_kv_cache_manager import ContiguousKVCacheManager
from engine.cuda_graphs import cuda_capture
from engine.device import cpu_computes_bfloat16, resolve_device, resolve_dtype
from engine.kv_cache import DTYPES, KVLayout, PagedKVCache, blocks_in
from engine.kv_cache_manager import KVCacheManager
from engine.model import kv_layout, load_model, vocab_size
from engine.model_runner import ModelRunner, StepBatch
from engine.outputs import EngineInfo, EngineLoad, EngineStats, PrefillExport
from engine.request import Request, RequestStatus
from engine.sampler import Sampler, SamplingError
from engine.scheduler import Scheduler, SchedulerOutput

log = logging.getLogger(__name__)


@dataclass
class _Counters:
    prompt_tokens_computed: int = 0
    prompt_tokens_cached: int = 0
    generated_tokens: int = 0
    request_errors: int = 0  # requests ended by a failure of their own step work (FINISHED_ERROR)


class Engine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        self.model_path = models.resolve(config.model)
        self.model_id = os.path.basename(os.path.normpath(self.model_path))
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path, local_files_only=True)
        self.device = resolve_device(config.device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            raise ValueError(f"device={config.device!r}, but torch sees no CUDA GPU here "
                             f"(torch {torch.__version__}, CUDA_VISIBLE_DEVICES={visible!r})")
        self.dtype = resolve_dtype(config.dtype, self.device)
        if self.device.type == "cpu" and self.dtype == "bfloat16" and not cpu_computes_bfloat16():
            log.warning("bfloat16 on a CPU without bfloat16 dot-product instructions (AVX512-BF16, AMX) is "
                        "emulated, slower than float32")
        self.model = load_model(self.model_path, self.dtype, self.device)
        self.linear_backend = _resolve_linear_backend(config.linear_backend, self.dtype, self.device)
        if self.linear_backend == "onednn":  # the CPU fast path: packed GEMMs, one-call norms
            cpu_linear.pack_linears(self.model)
            cpu_norm.fuse_rms_norms(self.model)
        hf_config = self.model.config.get_text_config()
        self.vocab_size = vocab_size(self.model.config)
        self.eos_token_ids = _eos_token_ids(self.model_path, hf_config)
        self.layout = kv_layout(self.model.config, config.block_size, self.dtype)
        self.attention_backend = _resolve_backend(config.attention_backend, self.layout, self.device)
        self.kv_cache = PagedKVCache(self.layout, self._num_kv_blocks(), self.device)
        self.max_model_len = context_limit(config, self.model.config, self.kv_cache.num_blocks)
        self.kv = self._kv_manager()
        self.scheduler = Scheduler(self.kv, config.max_num_seqs, config.max_num_batched_tokens, config.scheduling,
                                   config.kv_watermark_tokens, config.swap_space_bytes,
                                   self.layout.bytes_per_block)
        self.runner = ModelRunner(self.model, self.kv_cache, self.attention_backend)
        if not config.enforce_eager and self.device.type == "cuda" and self.attention_backend == "triton":
            self.runner.capture_decode_graphs(config.max_num_seqs, self.max_model_len,
                                              cuda_capture(torch.cuda.graph_pool_handle()))
        self.sampler = Sampler(config.seed)
        self.requests: dict[str, Request] = {}  # unfinished requests, deferred ones included
        self.held: dict[str, Request] = {}  # finished hold_kv requests whose blocks are kept
        self._finished: list[Request] = []  # ended since the last pop_finished() or step()
        self._counters = _Counters()
        self._ids = itertools.count()

    def _num_kv_blocks(self) -> int:
        """The KV pool in blocks: num_kv_blocks, else kv_cache_bytes, else (CUDA) what the GPU has left after a
        profiled peak step, else the CPU default."""
        config = self.config
        if config.num_kv_blocks is not None:
            return config.num_kv_blocks
        if config.kv_cache_bytes is not None or self.device.type != "cuda":
            return blocks_in(self.layout, config.kv_cache_bytes or CPU_KV_CACHE_BYTES)
        return blocks_in(self.layout, memory_profile.kv_budget_from_gpu(
            self.model, self.layout, self.attention_backend, self.device, config))

    def _kv_manager(self) -> KVCacheManager | ContiguousKVCacheManager:
        config = self.config
        if config.kv_layout == "contiguous":
            return ContiguousKVCacheManager(self.kv_cache.num_blocks, config.block_size, config.contiguous_reserve,
                                            self._copy_kv_blocks)
        return KVCacheManager(self.kv_cache.num_blocks, config.block_size, config.enable_prefix_caching)

    def _copy_kv_blocks(self, src: list[int], dst: list[int]) -> None:
        """Copy whole blocks inside the KV tensor (every layer, K and V); src and dst may overlap."""
        self.kv_cache.copy_blocks(src, dst)

    # ---- requests -------------------------------------------------------------------------
    def tokenize(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt, add_special_tokens=False)
        return list(prompt)

    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise ValueError (naming the field and the limit) for a request the engine cannot serve."""
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling_params must be SamplingParams, got {type(params).__name__}")
        if not prompt_token_ids:
            raise ValueError("prompt must contain at least 1 token, got 0")
        if len(prompt_token_ids) > self.max_model_len:
            raise ValueError(f"prompt is {len(prompt_token_ids)} tokens, over max_model_len={self.max_model_len}")
        bad = [t for t in prompt_token_ids if not isinstance(t, int) or not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"prompt_token_ids contains {bad[0]!r}, outside the vocabulary [0, {self.vocab_size})")

    def add_request(self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None,
                    cache_salt: str | None = None, *, hold_kv: bool = False, defer: bool = False,
                    reserve_prefix: bool = True, slo: SLO | None = None,
                    reject_past_s: float | None = None, decode_seat_share: float | None = None,
                    resume_token_ids: list[int] | None = None) -> Request:
        """Queue one sequence (n is handled by the caller). Validates first: bad input allocates nothing.

        hold_kv: when the request finishes, keep its blocks until release_held()
        (the prefill role exports them first). defer: do not queue yet; instead
        reserve the longest locally cached prefix (those blocks cannot be evicted
        meanwhile; req.num_computed_tokens says how many tokens they hold), so
        the caller can attach KV from elsewhere for the rest, then enqueue().
        reserve_prefix=False skips that reservation (the whole prompt comes from elsewhere).
        slo: the request's latency targets (its product's), for the "slo" scheduling policy.
        reject_past_s: raise OverloadedError (adding nothing) when the predicted time to first token is past
        this many seconds (Scheduler.check_ttft); None: never.
        decode_seat_share: raise OverloadedError (adding nothing) when, with this request, more would decode
        here than this share of the seats the ITL targets allow (Scheduler.check_decode_seats); None: never.
        resume_token_ids: output another engine already generated for this prompt and params (Request.resume):
        computed here with the prompt, counted in max_tokens and stop checks, never output again; fewer than
        max_tokens, and prompt plus them within max_model_len.
        """
        prompt_token_ids = self.tokenize(prompt)
        resumed = list(resume_token_ids or [])
        self.validate(prompt_token_ids + resumed, params)
        if resumed and len(resumed) >= params.max_tokens:
            raise ValueError(f"{len(resumed)} tokens to resume from leave none of max_tokens={params.max_tokens}")
        request_id = request_id if request_id is not None else str(next(self._ids))
        if request_id in self.requests or request_id in self.held:
            raise ValueError(f"request_id {request_id!r} is already in use")
        req = Request(request_id=request_id, prompt_token_ids=prompt_token_ids, sampling_params=params,
                      hash_extra=extra_keys(self.model_id, cache_salt), max_total_tokens=self.max_model_len,
                      hold_kv=hold_kv, slo=slo)
        if resumed:
            req.resume(resumed)
        if reject_past_s is not None:
            self.scheduler.check_ttft(req, reject_past_s)
        if decode_seat_share is not None:
            self.scheduler.check_decode_seats([*self.requests.values(), req], decode_seat_share)
        if defer and reserve_prefix:
            blocks, num_cached = self.kv.get_computed_blocks(req)
            # Reserving only what is free right now cannot fail: touching cached blocks needs no new ones.
            self.kv.allocate_slots(req, 0, blocks)
            req.num_computed_tokens = num_cached
        self.requests[request_id] = req
        if not defer:
            self.scheduler.add(req)
        return req

    def attach_kv(self, request_id: str, blocks: torch.Tensor, num_tokens: int, *,
                  num_cached_tokens: int | None = None) -> None:
        """Give a deferred request K/V computed elsewhere for its next num_tokens prompt tokens.

        blocks: [num_layers, 2, n, block_size, Hkv, D] for the blocks right after
        the reserved prefix. The engine computes the rest of the prompt (and the
        first token accept_first_token gave it, if any) when the request runs.
        Raises ValueError on a mismatch, changing nothing.
        """
        req = self._deferred(request_id)
        bs = self.config.block_size
        start = req.num_computed_tokens
        expected = self.layout.blocks_shape(-(-(start + num_tokens) // bs) - start // bs)
        if tuple(blocks.shape) != expected or blocks.dtype != self.kv_cache.data.dtype:
            raise ValueError(f"KV payload {tuple(blocks.shape)} {blocks.dtype} does not fit {expected}")
        if not 0 < num_tokens <= req.num_prompt_tokens - start:
            raise ValueError(f"num_tokens={num_tokens} outside (0, {req.num_prompt_tokens - start}]")
        req.pending_kv, req.pending_kv_tokens = blocks, num_tokens
        _set_cached(req, num_cached_tokens)

    def accept_first_token(self, request_id: str, token: int, logprobs: dict[int, float] | None = None, *,
                           num_cached_tokens: int | None = None, sampler_state: bytes | None = None) -> bool:
        """A deferred request's first token, sampled by the prefill engine, taken before its KV arrives.

        Returns False when the token ends the request (a stop, or max_tokens 1): it is finished and its
        blocks are freed, so no KV is needed. Otherwise it stays deferred until enqueue(), with or
        without attach_kv() first (without: the prompt is computed here, the token kept). sampler_state
        (from `sampler_state()` there) continues a seeded request's random stream, so its tokens equal a
        one-engine run's. num_cached_tokens: prompt tokens the prefill side found cached. Raises
        ValueError, changing nothing, for a token outside the vocabulary or a request with output.
        """
        req = self._deferred(request_id)
        if req.num_output_tokens:
            raise ValueError(f"request {request_id!r} already has its first token")
        if not 0 <= token < self.vocab_size:
            raise ValueError(f"first_token {token} outside the vocabulary [0, {self.vocab_size})")
        if sampler_state is not None:
            req.restore_sampler_state(sampler_state)
        _set_cached(req, num_cached_tokens)
        self._accept_token(req, token, logprobs, time.monotonic())
        return not req.is_finished

    def enqueue(self, request_id: str) -> None:
        """Queue a deferred request (with attached KV, or to compute its prompt itself).

        A request its first token already ended (accept_first_token) is gone: nothing to do.
        """
        if request_id not in self.requests:
            return
        self.scheduler.add(self._deferred(request_id))

    def import_kv(self, request_id: str, blocks: torch.Tensor | None = None, num_tokens: int = 0, *,
                  num_cached_tokens: int | None = None) -> None:
        """Queue a deferred request with the K/V it got from elsewhere: one call for attach_kv, then enqueue.

        blocks None: nothing to attach, the engine computes the rest of the prompt. Otherwise attach_kv's
        rules hold, and a payload that does not fit raises ValueError changing nothing: the request stays
        deferred (import it again without blocks to compute it here, or abort it). A request its first
        token already ended is gone: nothing to do.
        """
        if request_id not in self.requests:
            return
        if blocks is not None:
            self.attach_kv(request_id, blocks, num_tokens, num_cached_tokens=num_cached_tokens)
        self.enqueue(request_id)

    def finish_prefill(self, request_id: str, skip_blocks: int = 0) -> PrefillExport:
        """Hand over a held (hold_kv) request that ended after its first token, and free its blocks.

        Returns a copy of its prompt's KV from block skip_blocks on (clamped to the prompt's full blocks),
        every full prompt block's hash, the first token and the sampler state. The blocks are freed
        whatever happens, a failed read included: nothing stays held. Raises ValueError, changing
        nothing, for a request that is not held (unknown, failed or aborted).
        """
        req = self.held.get(request_id)
        if req is None:
            raise ValueError(f"request {request_id!r} is not a held request")
        try:
            bs, num_prompt = self.config.block_size, req.num_prompt_tokens
            skip = min(skip_blocks, num_prompt // bs)
            return PrefillExport(
                blocks=self.read_held_blocks(request_id, skip), first_block=skip, num_tokens=num_prompt - skip * bs,
                block_hashes=list(req.full_block_hashes(bs, num_prompt)), first_token=req.output_token_ids[0],
                # the sampler gives logprobs only to requests that ask for them
                first_logprobs=req.output_logprobs[0] if req.output_logprobs else None,
                sampler_state=req.sampler_state())
        finally:
            self.release_held(request_id)

    def abort_request(self, request_id: str) -> None:
        """Stop a request now and free its blocks; unknown or finished ids are ignored."""
        req = self.requests.pop(request_id, None)
        if req is not None and not req.is_finished:
            self.scheduler.finish(req, RequestStatus.FINISHED_ABORTED)
            self._finished.append(req)
        self.release_held(request_id)

    def pop_finished(self) -> list[Request]:
        """Requests that ended since the last call or step (by a stop condition or abort)."""
        finished, self._finished = self._finished, []
        return finished

    def read_held_blocks(self, request_id: str, start_block: int, end_block: int | None = None) -> torch.Tensor:
        """A copy of blocks [start_block, end_block) of a finished request kept by hold_kv."""
        req = self.held[request_id]
        ids = [b.block_id for b in req.block_table[start_block:end_block]]
        return self.kv_cache.read_blocks(ids)

    def computed_prompt_blocks(self, request_id: str) -> int | None:
        """Leading full prompt blocks of an unfinished request whose K/V is computed and in its block table
        (their count; 0 while it waits or after a preemption). None once it is no longer unfinished (held,
        ended, aborted or unknown). Between steps only: a step's imports and forward then have landed."""
        req = self.requests.get(request_id)
        if req is None:
            return None
        return min(req.num_computed_tokens, req.num_prompt_tokens) // self.config.block_size

    def read_request_blocks(self, request_id: str, first_block: int, last_block: int) -> torch.Tensor:
        """A copy of blocks [first_block, last_block) of an unfinished request, all computed full prompt
        blocks (computed_prompt_blocks): [num_layers, 2, n, block_size, Hkv, D]. The blocks stay the
        request's (ref counts untouched), so a held prefill may export them while later chunks compute.
        Raises ValueError, changing nothing, for a range outside its computed full prompt blocks."""
        done = self.computed_prompt_blocks(request_id)
        if done is None or not 0 <= first_block < last_block <= done:
            raise ValueError(f"blocks [{first_block}, {last_block}) of request {request_id!r} are not computed "
                             f"full prompt blocks (computed: {done})")
        ids = [b.block_id for b in self.requests[request_id].block_table[first_block:last_block]]
        return self.kv_cache.read_blocks(ids)

    def sampler_state(self, request_id: str) -> bytes | None:
        """The random state of a held seeded request after its first token (None when the seed alone
        restores it: unseeded, or nothing drawn)."""
        return self.held[request_id].sampler_state()

    def read_cached_blocks(self, block_hashes: list[bytes]) -> torch.Tensor:
        """A copy of the blocks of the leading run of block_hashes still in the prefix cache
        ([num_layers, 2, n, block_size, Hkv, D]; n may be 0). Touches no ref count or LRU order."""
        ids = []
        for block_hash in block_hashes:
            block = self.kv.pool.get_cached_block(block_hash)
            if block is None:
                break
            ids.append(block.block_id)
        return self.kv_cache.read_blocks(ids)

    def release_held(self, request_id: str) -> bool:
        """Free the blocks of a finished hold_kv request. Idempotent; True if something was freed."""
        req = self.held.pop(request_id, None)
        if req is None:
            return False
        self.kv.free(req)
        return True

    def _deferred(self, request_id: str) -> Request:
        req = self.requests.get(request_id)
        if req is None or req.status != RequestStatus.WAITING or req in self.scheduler.waiting:
            raise ValueError(f"request {request_id!r} is not a deferred request")
        return req

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    def info(self) -> EngineInfo:
        return EngineInfo(self.config.block_size, self.layout, self.kv_cache.data.dtype)

    def load(self) -> EngineLoad:
        return EngineLoad(self.kv.num_free_blocks, self.kv.usage, len(self.scheduler.waiting),
                          self.scheduler.cost.per_token_s)

    # ---- the loop -----------------------------------------------------------------------------
    def step(self) -> list[Request]:
        """Run one engine step. Returns the requests that received a token (finished ones included)."""
        self._finished.clear()
        sched = self.scheduler.schedule()
        self._swap_out(sched.swapped_out)  # before anything writes into the blocks they just gave up
        if not sched.scheduled:
            return []
        started = time.monotonic()
        batch, logits = self.execute_model(sched)
        sampled = self.sampler(logits, batch.sample_requests)  # waits for the device: the step's real end
        now = time.monotonic()
        decodes = sum(1 for _, n in sched.scheduled if n == 1)
        self.scheduler.cost.observe(decodes, sched.num_tokens - decodes, now - started)
        for req, result in zip(batch.sample_requests, sampled, strict=True):
            if isinstance(result, SamplingError):
                self._fail(req, result)
                continue
            try:
                self._accept_token(req, *result, now)
            except Exception as exc:  # one request's stop check (a tokenizer, a stop string) fails alone
                self._fail(req, exc)
        return batch.sample_requests

    def execute_model(self, sched: SchedulerOutput) -> tuple[StepBatch, torch.Tensor]:
        """The device part of a step: write imported KV, run the packed forward, advance the computed
        counts. Returns the batch and its logits [len(batch.sample_requests), vocab] on the device."""
        for req, first_block in sched.imports:
            n = req.pending_kv.shape[2]
            self.kv_cache.write_blocks([b.block_id for b in req.block_table[first_block:first_block + n]],
                                       req.pending_kv)
            req.pending_kv, req.pending_kv_tokens = None, 0
        batch = self.runner.prepare(sched.scheduled)
        logits = self.runner.forward(batch)
        for req, n in sched.scheduled:
            start = req.num_computed_tokens
            self._counters.prompt_tokens_computed += max(0, min(start + n, req.num_prompt_tokens) - start)
            req.num_computed_tokens = start + n
        return batch, logits

    def _swap_out(self, requests: list[Request]) -> None:
        """Copy swapped-out requests' blocks to the host; they are imported back when the requests run again."""
        for req in requests:
            started = time.monotonic()
            req.pending_kv = self.kv_cache.read_blocks(req.swap_block_ids)
            self.scheduler.swap.observe_copy(req.pending_kv.nbytes, time.monotonic() - started)
            req.pending_kv_tokens, req.swap_block_ids = req.swap_tokens, None

    def _accept_token(self, req: Request, token: int, logprobs: dict[int, float] | None, now: float) -> None:
        """Append a sampled token, then end the request if a stop condition holds."""
        if req.first_token_time is None:
            req.first_token_time = now
            self._counters.prompt_tokens_cached += max(req.num_cached_tokens, 0)
        req.append_token(token, logprobs)
        self._counters.generated_tokens += 1
        status = self._check_stop(req)
        if status is not None:
            self.scheduler.finish(req, status, free=not req.hold_kv)
            self.requests.pop(req.request_id, None)
            self._finished.append(req)
            if req.hold_kv:
                self.held[req.request_id] = req

    def _fail(self, req: Request, exc: BaseException) -> None:
        """End one request whose step work failed (FINISHED_ERROR, blocks freed even under hold_kv: there is
        nothing to export); the batch's other requests are not touched."""
        if req.is_finished:  # failed after its last token was accepted: it ended already
            return
        req.error = f"{type(exc).__name__}: {exc}"
        self._counters.request_errors += 1
        self.scheduler.finish(req, RequestStatus.FINISHED_ERROR)
        self.requests.pop(req.request_id, None)
        self._finished.append(req)

    def _check_stop(self, req: Request) -> RequestStatus | None:
        params = req.sampling_params
        token = req.output_token_ids[-1]
        if token in params.stop_token_ids or (not params.ignore_eos and token in self.eos_token_ids):
            req.stop_reason = token
            return RequestStatus.FINISHED_STOPPED
        if params.stop and self._find_stop_string(req) is not None:
            return RequestStatus.FINISHED_STOPPED
        if req.num_output_tokens >= params.max_tokens or req.num_tokens >= req.max_total_tokens:
            return RequestStatus.FINISHED_LENGTH
        return None

    def _find_stop_string(self, req: Request) -> str | None:
        # Decode a tail window wide enough to hold the longest stop string (tokens hold >= 1 char).
        window = max(len(s) for s in req.sampling_params.stop) + 8
        tail = self.tokenizer.decode(req.output_token_ids[-window:], skip_special_tokens=True)
        for s in req.sampling_params.stop:
            if s in tail:
                req.stop_reason = s
                return s
        return None

    def output_text(self, req: Request) -> str:
        """The request's text; a stop string that ended it is cut off with what follows."""
        text = self.tokenizer.decode(req.output_token_ids, skip_special_tokens=True)
        if isinstance(req.stop_reason, str):
            cut = text.find(req.stop_reason)
            if cut >= 0:
                text = text[:cut]
        return text

    # ---- introspection ------------------------------------------------------------------------
    def stats(self) -> EngineStats:
        return EngineStats(
            num_blocks_total=self.kv_cache.num_blocks,
            num_blocks_free=self.kv.num_free_blocks,
            kv_cache_usage=self.kv.usage,
            num_requests_running=len(self.scheduler.running),
            num_requests_waiting=len(self.scheduler.waiting),
            num_requests_deferred=len(self.requests) - len(self.scheduler.running) - len(self.scheduler.waiting),
            num_requests_held=len(self.held),
            prefix_cache_queries=self.kv.stats.queries,
            prefix_cache_hits=self.kv.stats.hits,
            prompt_tokens_computed=self._counters.prompt_tokens_computed,
            prompt_tokens_cached=self._counters.prompt_tokens_cached,
            num_preemptions=self.scheduler.num_preemptions,
            num_swap_outs=self.scheduler.swap.num_swap_outs,
            num_generated_tokens=self._counters.generated_tokens,
            num_request_errors=self._counters.request_errors,
            num_admission_failures=self.scheduler.num_admission_failures,
            num_admission_failures_free_memory=self.scheduler.num_admission_failures_free_memory,
            num_growth_failures=self.scheduler.num_growth_failures,
            largest_free_hole_blocks=self.kv.largest_free_hole,
            num_waiting_prompt_tokens=self.scheduler.num_waiting_prompt_tokens(),
            recent_decode_step_s=self.scheduler.cost.decode_step_s or 0.0,
            **self._move_stats(),
        )

    def _move_stats(self) -> dict[str, int | float]:
        if not isinstance(self.kv, ContiguousKVCacheManager):  # paged: KV never moves
            return {}
        moves = self.kv.moves
        return {"num_kv_moves": moves.moves, "kv_bytes_moved": moves.blocks_copied * self.layout.bytes_per_block,
                "kv_move_seconds": moves.seconds}


def _set_cached(req: Request, num_cached_tokens: int | None) -> None:
    """Record prompt tokens another engine found cached (None: leave the count as it is)."""
    if num_cached_tokens is not None:
        req.num_cached_tokens = min(num_cached_tokens, req.num_prompt_tokens)


def context_limit(config: EngineConfig, hf_config: PretrainedConfig, num_blocks: int | None = None) -> int:
    """max_model_len in tokens: the configured limit, capped by the model's positions and by the
    whole KV pool (a request must always fit alone, or preemption could loop forever).

    num_blocks: the pool's size when known (the engine's own); else it follows from the config, except
    for a pool sized from free GPU memory, which only the engine knows (then the pool does not cap it).
    """
    device = resolve_device(config.device)
    if num_blocks is None and (config.num_kv_blocks or config.kv_cache_bytes or device.type != "cuda"):
        layout = kv_layout(hf_config, config.block_size, resolve_dtype(config.dtype, device))
        num_blocks = config.num_kv_blocks or (config.kv_cache_bytes or CPU_KV_CACHE_BYTES) // layout.bytes_per_block
    model_max = getattr(hf_config.get_text_config(), "max_position_embeddings", None)
    limits = [n for n in (config.max_model_len, model_max, num_blocks and num_blocks * config.block_size) if n]
    return min(limits)


def _eos_token_ids(path: str, hf_config) -> set[int]:
    ids: set[int] = set()
    try:
        gen = GenerationConfig.from_pretrained(path, local_files_only=True)
        eos = gen.eos_token_id
    except OSError:
        eos = getattr(hf_config, "eos_token_id", None)
    if isinstance(eos, int):
        ids.add(eos)
    elif eos:
        ids.update(eos)
    return ids


def _resolve_linear_backend(name: str, dtype: str, device: torch.device) -> str:
    """auto: oneDNN with packed weights where the model runs on the CPU in a dtype oneDNN packs, else torch."""
    if name not in ("auto", "onednn"):
        return name
    fits = device.type == "cpu" and cpu_linear.supports(DTYPES[dtype])
    return _fitting(name, "onednn", fits, f"linear_backend 'onednn' needs the CPU, float32 or bfloat16 and a "
                                          f"torch with oneDNN; got {dtype}")


def _resolve_backend(name: str, layout: KVLayout, device: torch.device) -> str:
    """auto: the Triton kernels on CUDA; on the CPU the C kernel where it fits and builds, else torch.

    "triton" off CUDA runs only under Triton's interpreter (tests); "cpu" needs the CPU.
    """
    if name == "auto" and device.type == "cuda":
        return "triton"
    if name not in ("auto", "cpu"):
        return name
    fits = (device.type == "cpu" and cpu_attention.supports(layout.dtype, layout.head_dim)
            and cpu_attention.available())
    return _fitting(name, "cpu", fits, f"attention_backend 'cpu' needs the CPU, float32 or bfloat16, head_dim "
                                       f"% 16 == 0 and a C compiler; got {device.type}, {layout.dtype}, "
                                       f"head_dim {layout.head_dim}")


def _fitting(name: str, backend: str, fits: bool, refusal: str) -> str:
    """name is "auto" or `backend`: auto takes it where it fits, else torch; asked for and unfit is a ValueError."""
    if name == "auto":
        return backend if fits else "torch"
    if not fits:
        raise ValueError(refusal)
    return name

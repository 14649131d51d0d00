"""Engine.step(): schedule -> packed forward -> sample -> update. No Ray, no threads.

The engine owns the model, the paged KV cache, the block pool and the
scheduler. Callers add requests, call step() until nothing is unfinished, and
read each request's tokens. Every request that ends (stop, length, abort)
returns all its blocks to the pool in the same call.
"""

from __future__ import annotations

import itertools
import os
import time
from dataclasses import dataclass

import torch
from transformers import AutoTokenizer, GenerationConfig

from engine.block_hash import extra_keys
from engine.config import EngineConfig, SamplingParams
from engine.kv_cache import PagedKVCache
from engine.kv_cache_manager import KVCacheManager
from engine.model import kv_layout, load_model
from engine.model_runner import ModelRunner
from engine.outputs import EngineStats
from engine.request import Request, RequestStatus
from engine.sampler import Sampler
from engine.scheduler import Scheduler


@dataclass
class _Counters:
    prompt_tokens_computed: int = 0
    prompt_tokens_cached: int = 0
    generated_tokens: int = 0


class Engine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        self.model_path = config.model or _builtin_model_path()
        self.model_id = os.path.basename(os.path.normpath(self.model_path))
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path, local_files_only=True)
        self.model = load_model(self.model_path, config.dtype)
        hf_config = self.model.config.get_text_config()
        self.vocab_size: int = hf_config.vocab_size
        self.eos_token_ids = _eos_token_ids(self.model_path, hf_config)
        self.layout = kv_layout(self.model.config, config.block_size, config.dtype)
        if config.num_kv_blocks is not None:
            self.kv_cache = PagedKVCache(self.layout, config.num_kv_blocks)
        else:
            self.kv_cache = PagedKVCache.from_budget(self.layout, config.kv_cache_bytes)
        capacity = self.kv_cache.num_blocks * config.block_size
        model_max = getattr(hf_config, "max_position_embeddings", capacity)
        # A request must always fit alone in the pool, or preemption could loop forever.
        self.max_model_len = min(config.max_model_len or model_max, model_max, capacity)
        self.kv = KVCacheManager(self.kv_cache.num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.kv, config.max_num_seqs, config.max_num_batched_tokens)
        self.runner = ModelRunner(self.model, self.kv_cache, _resolve_backend(config.attention_backend))
        self.sampler = Sampler(config.seed)
        self.requests: dict[str, Request] = {}
        self._counters = _Counters()
        self._ids = itertools.count()

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
                    cache_salt: str | None = None) -> Request:
        """Queue one sequence (n is handled by the caller). Validates first: bad input allocates nothing."""
        prompt_token_ids = self.tokenize(prompt)
        self.validate(prompt_token_ids, params)
        request_id = request_id if request_id is not None else str(next(self._ids))
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        req = Request(request_id=request_id, prompt_token_ids=prompt_token_ids, sampling_params=params,
                      hash_extra=extra_keys(self.model_id, cache_salt), max_total_tokens=self.max_model_len)
        self.requests[request_id] = req
        self.scheduler.add(req)
        return req

    def abort_request(self, request_id: str) -> None:
        """Stop a request now and free its blocks; unknown or finished ids are ignored."""
        req = self.requests.pop(request_id, None)
        if req is not None and not req.is_finished:
            self.scheduler.finish(req, RequestStatus.FINISHED_ABORTED)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    # ---- the loop -----------------------------------------------------------------------------
    def step(self) -> list[Request]:
        """Run one engine step. Returns the requests that received a token (finished ones included)."""
        sched = self.scheduler.schedule()
        if not sched.scheduled:
            return []
        batch = self.runner.prepare(sched.scheduled)
        logits = self.runner.forward(batch)
        for req, n in sched.scheduled:
            start = req.num_computed_tokens
            self._counters.prompt_tokens_computed += max(0, min(start + n, req.num_prompt_tokens) - start)
            req.num_computed_tokens = start + n
        sampled = self.sampler(logits, batch.sample_requests)
        now = time.monotonic()
        for req, (token, logprobs) in zip(batch.sample_requests, sampled, strict=True):
            if req.first_token_time is None:
                req.first_token_time = now
                self._counters.prompt_tokens_cached += req.num_cached_tokens
            req.append_token(token, logprobs)
            self._counters.generated_tokens += 1
            status = self._check_stop(req)
            if status is not None:
                self.scheduler.finish(req, status)
                self.requests.pop(req.request_id, None)
        return batch.sample_requests

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
            prefix_cache_queries=self.kv.stats.queries,
            prefix_cache_hits=self.kv.stats.hits,
            prompt_tokens_computed=self._counters.prompt_tokens_computed,
            prompt_tokens_cached=self._counters.prompt_tokens_cached,
            num_preemptions=self.scheduler.num_preemptions,
            num_generated_tokens=self._counters.generated_tokens,
        )


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


def _builtin_model_path() -> str:
    from engine.tiny_model import path  # builds the weights on first use only

    return path("tiny")


def _resolve_backend(name: str) -> str:
    if name == "auto":
        return "triton" if torch.cuda.is_available() else "torch"
    return name

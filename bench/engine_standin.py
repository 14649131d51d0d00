"""A stand-in Engine for control-plane load tests: the real scheduler, block pool and KV cache, no model forward.

NOT A SERVING OPTION. It answers with made-up tokens. Nothing in a product file, EngineConfig or the
CLI selects it: only bench code builds it (bench/standin_app.py deploys it for bench/control_plane.py).

What is real: everything of Engine but the forward and the sampler. Requests go through the scheduler
(continuous batching, chunked prefill, admission, preemption), the block pool and prefix cache (hashes,
ref counts, LRU), hold_kv and finish_prefill, import_kv; the KV tensor exists (the built-in tiny model's
layout, 512 bytes per token) so exports, transfers and imports move real bytes (zeros: nothing computes them).

What stands in:
- a step's duration comes from a cost model (StandinCost: bench/incident_sim.GPUSpec, a Llama-3-8B-shaped
  model on one H100) and is spent in time.sleep on the engine's own thread, so N replicas cost the host
  no model math, only the engine's and the control plane's own work;
- its tokens are deterministic (a function of the request's prompt length and the token's position),
  drawn from tokens that decode to plain words and never an end-of-text token: every answer runs to its
  max_tokens (or a stop string).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from bench.incident_sim import GPUSpec
from engine.config import EngineConfig
from engine.engine import Engine
from engine.request import Request
from engine.sampler import Sampled

log = logging.getLogger(__name__)

STANDIN_MODEL = "tiny"  # only its tokenizer and KV layout are used; a real model's weights would sit idle
NUM_WORD_TOKENS = 512  # the tokens answers are made of
_PRIMES = (7919, 104729)  # spread consecutive positions and prompt lengths over the word tokens


@dataclass(frozen=True)
class StandinCost:
    """How long a step of the simulated GPU lasts: `gpu`'s prefill and decode times, times time_scale."""

    gpu: GPUSpec = GPUSpec()
    time_scale: float = 1.0  # > 1: a slower GPU (e.g. to keep a small host from being the bottleneck)

    def __post_init__(self) -> None:
        if not self.time_scale > 0:
            raise ValueError(f"time_scale must be > 0, got {self.time_scale}")

    def step_s(self, prompt_tokens: int, decodes: int, context_tokens: int) -> float:
        """Seconds of one step: prefill_s of its prompt tokens, plus (when it decodes) one decode step that
        reads the weights once and the K/V of context_tokens tokens."""
        seconds = self.gpu.prefill_s(prompt_tokens)
        if decodes:
            seconds += self.gpu.decode_s(1, context_tokens)
        return seconds * self.time_scale


DEFAULT_COST = StandinCost()


@dataclass(frozen=True)
class StandinBatch:
    """One step as the stand-in runs it. sample_requests get a token after it; step_s: its sleep, seconds."""

    sample_requests: list[Request]
    prompt_tokens: int
    decodes: int
    context_tokens: int
    step_s: float


class StandinRunner:
    """ModelRunner's two calls without a model: prepare() prices the step, forward() sleeps that long.

    Counters (for tests and reports): steps, slept_s (the sum of step_s), last (the last batch).
    """

    def __init__(self, cost: StandinCost, sleep: Callable[[float], None] = time.sleep) -> None:
        self.cost = cost
        self._sleep = sleep
        self.steps = 0
        self.slept_s = 0.0
        self.last: StandinBatch | None = None

    def prepare(self, scheduled: list[tuple[Request, int]]) -> StandinBatch:
        """scheduled: (request, tokens this step). Prompt tokens are those below a request's prompt length;
        a request with none is decoding and reads its whole context."""
        prompt_tokens = decodes = context = 0
        sample: list[Request] = []
        for req, n in scheduled:
            start = req.num_computed_tokens
            prompt = max(0, min(start + n, req.num_prompt_tokens) - start)
            prompt_tokens += prompt
            if not prompt:
                decodes += 1
                context += start + n
            if start + n == req.num_tokens:  # the same rule as ModelRunner: complete, so it samples next
                sample.append(req)
        return StandinBatch(sample, prompt_tokens, decodes, context, self.cost.step_s(prompt_tokens, decodes, context))

    def forward(self, batch: StandinBatch) -> None:
        """The step's time on the simulated GPU, slept on the engine thread. No logits: the sampler needs none."""
        self._sleep(batch.step_s)
        self.steps += 1
        self.slept_s += batch.step_s
        self.last = batch


class StandinSampler:
    """Engine's sampler without logits: each request's next token is a fixed function of where it is."""

    def __init__(self, word_tokens: list[int]) -> None:
        if not word_tokens:
            raise ValueError("the stand-in needs at least one word token")
        self.word_tokens = word_tokens

    def __call__(self, logits: None, requests: list[Request]) -> list[Sampled]:
        return [self._sample(req) for req in requests]

    def _sample(self, req: Request) -> Sampled:
        token = standin_token(req.num_prompt_tokens, req.num_tokens, self.word_tokens)
        return token, ({token: 0.0} if req.sampling_params.logprobs is not None else None)


def standin_token(num_prompt_tokens: int, position: int, word_tokens: list[int]) -> int:
    """The token at `position` (0-based, over prompt and output) of an answer to a prompt of that length."""
    return word_tokens[(position * _PRIMES[0] + num_prompt_tokens * _PRIMES[1]) % len(word_tokens)]


class StandinEngine(Engine):
    """Engine with StandinRunner and StandinSampler in place of the model's forward and sampling.

    Built on STANDIN_MODEL with the torch backends (nothing to compile or pack: the model never runs).
    """

    def __init__(self, config: EngineConfig, cost: StandinCost = DEFAULT_COST) -> None:
        super().__init__(standin_config(config))
        self.runner = StandinRunner(cost)  # type: ignore[assignment]  # duck-typed: prepare + forward
        self.sampler = StandinSampler(word_tokens(self.tokenizer, self.eos_token_ids))  # type: ignore[assignment]
        log.warning("STAND-IN ENGINE (bench only): no model runs here; tokens are synthetic, step times are "
                    "a cost model's (%s)", cost)


def standin_config(config: EngineConfig) -> EngineConfig:
    """config on the stand-in's model with the torch backends. Raises ValueError for another model: a real
    model's weights would be loaded into every replica for nothing."""
    if config.model not in (None, STANDIN_MODEL):
        raise ValueError(f"the stand-in engine runs on the {STANDIN_MODEL!r} model's tokenizer and KV layout, "
                         f"not {config.model!r}")
    return dataclasses.replace(config, model=STANDIN_MODEL, attention_backend="torch", linear_backend="torch",
                               device="cpu")


def word_tokens(tokenizer, eos_token_ids: set[int], count: int = NUM_WORD_TOKENS) -> list[int]:
    """The first `count` token ids that decode alone to a plain ASCII word (never an end token): streamed
    answers then show text for every token."""
    found = []
    for token in range(len(tokenizer)):
        text = tokenizer.decode([token])
        if token not in eos_token_ids and text.strip().isalpha() and text.isascii():
            found.append(token)
            if len(found) == count:
                break
    return found

"""One sequence's state inside the engine.

Token accounting (all in tokens):
  all_token_ids = prompt_token_ids + output_token_ids
  num_computed_tokens <= num_tokens: K/V of all_token_ids[:num_computed_tokens]
  is in the blocks of block_table (len(block_table) * block_size >= that count).
A decode step computes the one token sampled last step; a prefill step computes
a chunk of the prompt. Preemption frees the blocks and sets
num_computed_tokens = 0 (recompute), keeping the tokens already generated.
A resumed request (resume()) starts the same way: its first num_resumed_tokens
outputs came from another engine and are computed here like a preempted
request's, so its first sampled token is the next new one.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from engine.block_hash import BlockHash, hash_full_blocks
from engine.block_pool import KVBlock
from engine.config import SLO, SamplingParams

# The time-to-first-token target of a request that names none: it still ages into the front of the queue
# under the "slo" policy, so it is never starved by a steady stream of requests with targets.
DEFAULT_TTFT_S = 30.0


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"
    FINISHED_ERROR = "error"  # this request's step work failed (Request.error says how); the others went on

    @property
    def finished(self) -> bool:
        return self in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH,
                        RequestStatus.FINISHED_ABORTED, RequestStatus.FINISHED_ERROR)


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    hash_extra: bytes  # model id + cache salt, mixed into every block hash
    max_total_tokens: int  # max_model_len: prompt + output never exceed it
    arrival_time: float = field(default_factory=time.monotonic)
    output_token_ids: list[int] = field(default_factory=list)
    output_logprobs: list[dict[int, float]] = field(default_factory=list)
    all_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = -1  # prompt tokens taken from the prefix cache at first admission
    expected_cached_tokens: int = 0  # what the prefix cache held of it when queued: a prediction's estimate
    block_table: list[KVBlock] = field(default_factory=list)
    block_hashes: list[BlockHash] = field(default_factory=list)
    num_published_blocks: int = 0  # leading blocks of block_table already offered to the prefix cache
    status: RequestStatus = RequestStatus.WAITING
    stop_reason: int | str | None = None
    error: str | None = None  # why it ended with FINISHED_ERROR
    num_preemptions: int = 0
    # seeded requests: created from the seed by generator_on() at the first draw, on the sampling device
    generator: torch.Generator | None = None
    first_token_time: float | None = None
    hold_kv: bool = False  # on finish keep the blocks (prefill role: until the KV is exported)
    # K/V computed elsewhere (another engine, the prefix directory) for tokens
    # [num_computed_tokens, num_computed_tokens + pending_kv_tokens), written into
    # fresh blocks when the scheduler admits the request.
    pending_kv: torch.Tensor | None = None
    pending_kv_tokens: int = 0
    # a random state carried over from another engine before this one created the generator
    carried_sampler_state: bytes | None = field(default=None, repr=False)
    slo: SLO | None = None  # latency targets (the "slo" scheduling policy reads them)
    # Swapped out by a preemption (engine/swap_space.py): the blocks to copy to the host before the step
    # runs (then None), the computed tokens they hold, and the host bytes reserved until written back.
    swap_block_ids: list[int] | None = field(default=None, repr=False)
    swap_tokens: int = 0
    swap_bytes: int = 0
    # A resumed request (resume()): leading output tokens another engine generated and the client already has.
    num_resumed_tokens: int = 0
    # Random draws that run made from this request's seed, replayed onto the generator before its next one.
    num_draws_to_replay: int = 0

    def __post_init__(self) -> None:
        self.all_token_ids = list(self.prompt_token_ids)

    def generator_on(self, device: torch.device) -> torch.Generator | None:
        """A seeded request's generator on `device` (None when unseeded): made at the first call, from the
        seed and then any carried-over state. Raises ValueError for another device than the first call's,
        RuntimeError for a carried-over state the device's generator cannot take."""
        seed = self.sampling_params.seed
        if seed is None:
            return None
        if self.generator is None:
            # torch takes 64-bit seeds; any integer maps onto one, so a huge or negative seed is still a seed
            generator = torch.Generator(device=device).manual_seed(seed % (1 << 64))
            if self.carried_sampler_state is not None:
                generator.set_state(_state_tensor(self.carried_sampler_state))
                self.carried_sampler_state = None
            self.generator = generator
        elif self.generator.device != device:
            raise ValueError(f"request {self.request_id!r} samples on {self.generator.device}, not {device}")
        return self.generator

    def sampler_state(self) -> bytes | None:
        """The random state to continue this request elsewhere (an engine on the same kind of device), or
        None when the seed alone restores it (unseeded, or nothing drawn here yet). A resumed request whose
        replay is still pending has no state yet: ValueError."""
        if self.num_draws_to_replay:
            raise ValueError(f"request {self.request_id!r} has {self.num_draws_to_replay} draws still to replay")
        if self.generator is not None:
            return self.generator.get_state().numpy().tobytes()
        return self.carried_sampler_state

    def restore_sampler_state(self, state: bytes) -> None:
        """Continue the random stream another engine's sampler_state() gave; ignored when unseeded."""
        if self.sampling_params.seed is None:
            return
        if self.generator is not None:
            self.generator.set_state(_state_tensor(state))
        else:
            self.carried_sampler_state = bytes(state)

    def resume(self, token_ids: list[int]) -> None:
        """Continue a run that another engine began: token_ids, the output it already delivered, become this
        request's leading output (context to compute, never sent again). A seeded sampled request replays one
        draw per token onto its generator (engine.sampler.replay_draws), so its next token is the one that run
        would have drawn. Called before the request first runs, at most once."""
        if self.output_token_ids or self.generator is not None:
            raise ValueError(f"request {self.request_id!r} already ran: it cannot be resumed")
        for token_id in token_ids:
            self.append_token(token_id, {} if self.sampling_params.logprobs is not None else None)
        self.num_resumed_tokens = len(token_ids)
        if self.sampling_params.seed is not None and not self.sampling_params.greedy:
            self.num_draws_to_replay = len(token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status.finished

    @property
    def ttft_deadline(self) -> float:
        """time.monotonic() by which the first token is due (DEFAULT_TTFT_S after arrival without an SLO)."""
        return self.arrival_time + (self.slo.ttft_s if self.slo is not None else DEFAULT_TTFT_S)

    @property
    def itl_target(self) -> float:
        """Seconds allowed between two tokens; inf without an SLO."""
        return self.slo.itl_s if self.slo is not None else float("inf")

    def step_time_allowed(self, now: float, max_gap_targets: float) -> float:
        """Seconds the next step may take (from `now`, time.monotonic()) and keep this request's mean time per
        output token after its first (since its first token on this engine) within itl_target: the target for
        this gap plus what earlier, faster gaps left unused, but at most max_gap_targets targets, so one gap
        stays bounded. itl_target until a token came here (inf without an SLO)."""
        produced = self.num_output_tokens - self.num_resumed_tokens
        if self.slo is None or self.first_token_time is None or produced < 1:
            return self.itl_target
        slack = self.itl_target * produced - (now - self.first_token_time)
        return min(slack, max_gap_targets * self.itl_target)

    def blocks_to_grow(self, block_size: int, horizon_tokens: int) -> int:
        """Blocks this request still needs for its next horizon_tokens tokens (at most to max_tokens)."""
        limit = min(self.num_prompt_tokens + self.sampling_params.max_tokens, self.max_total_tokens)
        wanted = min(self.num_tokens + horizon_tokens, limit)
        return max(0, -(-wanted // block_size) - len(self.block_table))

    def append_token(self, token_id: int, logprobs: dict[int, float] | None = None) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)
        if logprobs is not None:
            self.output_logprobs.append(logprobs)

    def full_block_hashes(self, block_size: int, num_tokens: int) -> list[BlockHash]:
        """Hashes of every full block within the first num_tokens tokens (cached on the request)."""
        if len(self.block_hashes) < num_tokens // block_size:
            self.block_hashes = hash_full_blocks(self.all_token_ids[:num_tokens], block_size,
                                                 self.hash_extra, self.block_hashes)
        return self.block_hashes[: num_tokens // block_size]


def _state_tensor(state: bytes) -> torch.Tensor:
    """A generator state as torch wants it: a CPU uint8 tensor, for CPU and CUDA generators alike."""
    return torch.frombuffer(bytearray(state), dtype=torch.uint8)

"""What a decode worker asks of a prefill worker, and what it gets back."""

from __future__ import annotations

from dataclasses import dataclass

from engine.config import SLO, SamplingParams
from kvtransfer.handle import KVHandle


@dataclass(frozen=True)
class PrefillRequest:
    """Prefill prompt_token_ids and sample the first token with `sampling_params`.

    skip_blocks: leading full blocks the caller already holds (same hashes);
    they are left out of the returned KV.
    slo: the product's latency targets (the engine's "slo" scheduling orders and sizes work by them).
    reject_past_s: refuse at once (OverloadedError) when the predicted time to first token is past this.
    """

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    cache_salt: str | None = None
    skip_blocks: int = 0
    slo: SLO | None = None
    reject_past_s: float | None = None


@dataclass(frozen=True)
class PrefillResult:
    """first_token sampled from the last prompt position; kv covers tokens [skip_blocks * block_size, prompt),
    or with prefill_stream from where the last PrefillChunk ended."""

    request_id: str
    first_token: int
    first_logprobs: dict[int, float] | None
    num_cached_tokens: int  # prompt tokens the prefill worker took from its pool or the directory
    num_computed_tokens: int  # prompt tokens it actually ran through the model
    kv: KVHandle
    worker_id: str
    prefill_seconds: float
    sampler_state: bytes | None = None  # a seeded request's random state after the first token


@dataclass(frozen=True)
class PrefillChunk:
    """Part of a prompt's KV, exported while its prefill still runs (PrefillServer.prefill_stream).

    kv covers whole computed blocks [kv.first_block, kv.first_block + kv.shape[2]); the chunks of one
    request come in order, each starting where the previous ended, the first at skip_blocks, and the
    final PrefillResult's kv starts where the last chunk ended. The caller owns each export once it has
    the chunk: it fetches it or releases it (release_kv(kv.export_id, worker_id)); its lease is the backstop.
    """

    request_id: str
    kv: KVHandle
    worker_id: str

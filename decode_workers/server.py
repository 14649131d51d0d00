"""DecodeServer: owns a request from arrival to its last token.

Disaggregated: reserve the prompt's blocks this worker already holds, ask a
PrefillServer to prefill the rest (first token only), stream that first
token at once, fetch the KV through kvtransfer into this worker's pool (not
at all when the first token ended the request), join the running batch,
stream the rest. A failed, corrupt or timed-out prefill or transfer falls
back to computing the prompt here: slower, never lost, and counted.
Colocated (no prefill handle): the same engine does both.

Abort (the consumer stops iterating: client gone, cancel) frees the request's
blocks before the next engine step here, and cancels the prefill call, whose
own abort frees the blocks on the prefill side.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import asdict, dataclass

import torch

from decode_workers.prefill_placement import PrefillPlacement
from decode_workers.streamed_kv import StreamedKV
from decode_workers.token_stream import TokenStreamTarget
from decode_workers.token_stream_sender import TokenStreamSender
from engine.config import SLO, EngineConfig, SamplingParams
from engine.outputs import EngineStats
from engine.request import Request
from engine.scheduler import OverloadedError
from kvtransfer import KVHandle, KVTransferConfig, KVTransferError
from prefill_workers.engine_worker import EngineWorker, WorkerStats
from prefill_workers.protocol import PrefillChunk, PrefillRequest, PrefillResult
from prefill_workers.remote_calls import awaited, call_streaming, cancel, stream_items

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DecodeStats(WorkerStats):
    kv_transfer_bytes: int  # payloads fetched (bytes)
    kv_transfer_seconds: float  # spent fetching them (seconds)
    kv_transfer_failures: int  # fetches that failed, and fetched payloads the engine refused
    prefill_failures: int
    recomputed_prefills: int
    remote_prefills: int
    local_prefills: int = 0  # short prompts computed here by choice (PrefillPlacement), not after a failure


class DecodeServer(EngineWorker):
    role = "decode"

    def __init__(self, engine_config: EngineConfig | dict | None = None,
                 transfer_config: KVTransferConfig | dict | None = None,
                 prefill=None, prefill_timeout_s: float = 60.0, worker_id: str | None = None,
                 dedup: bool = True, local_prefill_max_tokens: int = 0, kv_streaming: bool = False) -> None:
        """prefill: a handle whose `.prefill.remote(PrefillRequest)` is awaitable (a Ray actor
        handle or a Serve DeploymentHandle), or None for colocated mode. dedup=False asks for
        every block even when this worker holds some (for measuring what dedup saves).
        local_prefill_max_tokens: with a prefill handle, prompts whose uncached part is at most this many
        tokens may be computed here when that is cheaper than the remote path (PrefillPlacement).
        kv_streaming: call the prefill worker's prefill_stream, fetching the KV of each prefill chunk while
        later chunks compute (StreamedKV), instead of one export after the whole prompt."""
        super().__init__(engine_config, transfer_config, worker_id)
        self.prefill_handle = prefill
        self.prefill_timeout_s = prefill_timeout_s
        self.dedup = dedup
        self.kv_streaming = kv_streaming
        # the connector counts fetches and their failures; these count what the worker made of them
        self._refused_imports = self._prefill_failures = self._recomputed = self._remote = self._local = 0
        self.placement = PrefillPlacement(local_prefill_max_tokens)
        self._token_streams = TokenStreamSender()

    async def generate(self, request: dict) -> AsyncIterator[dict]:
        """request: {"request_id"?, "prompt_token_ids", "sampling_params": dict | SamplingParams,
        "cache_salt"?, "slo"?: {ttft_s, itl_s}, "reject_past_s"?: seconds, "decode_seat_share"?: fraction,
        "resume_token_ids"?: list[int]}. Yields StepOutput dicts; raises ValueError for bad input and
        OverloadedError (the predicted time to first token is past reject_past_s, here or on the prefill
        worker, or this engine's decode seats are full for decode_seat_share) before any output.

        resume_token_ids: the output another replica already delivered for this prompt and sampling params
        (it died mid-stream). They are computed here with the prompt, as a colocated request (that replica's
        KV died with it; the prompt's blocks may still hit this pool's prefix cache), and the outputs go on
        from the next new token, counted against the same max_tokens."""
        rid = request.get("request_id") or uuid.uuid4().hex
        params = request["sampling_params"]
        if not isinstance(params, SamplingParams):
            params = SamplingParams(**params)
        prompt = request["prompt_token_ids"]
        salt = request.get("cache_salt")
        slo = SLO(**request["slo"]) if request.get("slo") else None
        reject_past_s = request.get("reject_past_s")
        seat_share = request.get("decode_seat_share")
        resume = request.get("resume_token_ids") or None
        here = self.prefill_handle is None or resume  # else a prefill worker computes the prompt (and predicts)
        stream = self.engine.open_stream(rid)
        with self._adding(rid):
            req = await self.engine.add_request(prompt, params, rid, salt, defer=not here, reserve_prefix=self.dedup,
                                                slo=slo, reject_past_s=reject_past_s if here else None,
                                                decode_seat_share=seat_share, resume_token_ids=resume)
        if here:
            async for out in self.engine.iterate(rid, stream):
                yield asdict(out)
            return
        finished = False
        chunks = StreamedKV(self.connector, self.layout, req.num_prompt_tokens) if self.kv_streaming else None
        try:
            async with contextlib.aclosing(self.engine.iterate(rid, stream)) as outputs:
                called = time.monotonic()
                result = await self._prefill(req, PrefillRequest(rid, req.prompt_token_ids, params, salt,
                                                                 req.num_computed_tokens // self.block_size, slo,
                                                                 reject_past_s), chunks)
                call_s = time.monotonic() - called
                blocks, kv_tokens = None, 0
                try:
                    continues = None if result is None else await self._accept_first_token(rid, result)
                    if continues is not None:  # out before the KV: the client has it a transfer sooner
                        first = await anext(outputs)
                        finished = first.finished
                        yield asdict(first)
                    if continues:
                        fetched = time.monotonic()
                        blocks, kv_tokens = await self._fetch_kv(rid, result.kv, chunks)
                        if blocks is not None:
                            self.placement.observe_remote(call_s, result.prefill_seconds, time.monotonic() - fetched)
                finally:
                    if result is not None:
                        self._release_remote(result.kv.export_id, result.worker_id)
                    self._release_chunks(chunks)
                if not finished:
                    await self._import_kv(rid, blocks, kv_tokens)
                # drop the export's handle (with the Ray transport, a reference to its object) and the payload
                # now, not when the request ends: the imported KV is in this pool
                result = blocks = None
                if not finished:
                    async for out in outputs:
                        finished = out.finished
                        yield asdict(out)
        finally:
            self._release_chunks(chunks)  # again: a prefill cancelled or failed before its result
            if not finished:  # consumer gone or prefill cancelled: free the blocks here now
                self.engine.discard_stream(rid)
                await self.engine.abort(rid)

    @contextlib.contextmanager
    def _adding(self, rid: str) -> Iterator[None]:
        """Around adding request rid, its stream open: an add that raises discards the stream, and this
        engine's refusal for load names this worker (the ingress may then try another replica)."""
        try:
            yield
        except BaseException as exc:
            self.engine.discard_stream(rid)
            if isinstance(exc, OverloadedError):
                exc.worker_id = self.worker_id
            raise

    async def generate_to(self, request: dict) -> dict:
        """`generate`, with the outputs sent over the direct token stream request["token_stream"] names
        (a TokenStreamTarget dict) instead of yielded; returns once the last one is written.

        The call stays the request's lifeline: cancelling it aborts the request (its blocks freed), and a lost
        token stream ends it with TokenStreamError. Nothing runs on the engine until the stream is connected.
        Returns {"num_output_tokens", "finish_reason"} of the last output.
        """
        target = TokenStreamTarget.from_dict(request.get("token_stream") or {})
        conn = await self._token_streams.connect(target)
        last: dict = {}
        async with contextlib.aclosing(self.generate(request)) as outputs:  # closing it aborts the request
            async for out in outputs:
                await conn.send(target.stream_id, out)
                last = out
        await conn.flush()
        return {"num_output_tokens": last.get("num_output_tokens", 0), "finish_reason": last.get("finish_reason")}

    async def _prefill(self, req: Request, request: PrefillRequest, chunks: StreamedKV | None) -> PrefillResult | None:
        """The remote prefill's result, or None when the prompt is computed here: by choice (a short
        uncached part, PrefillPlacement) or because the remote prefill failed."""
        uncached = req.num_prompt_tokens - req.num_computed_tokens
        if self.placement.here(uncached, self.engine.load().prompt_token_s):
            self._local += 1
            return None
        return await self._remote_prefill(request, chunks)

    async def _remote_prefill(self, request: PrefillRequest, chunks: StreamedKV | None) -> PrefillResult | None:
        """Prefill on a PrefillServer; None when that failed (the request is then computed here). A prefill
        worker that refused the request as overloaded is no failure to recover from: OverloadedError.
        chunks: receive the KV in chunks through prefill_stream (fetched into it as they come); None: prefill."""
        if chunks is None:
            call = self.prefill_handle.prefill.remote(request)
            result = awaited(call)
        else:
            call = call_streaming(self.prefill_handle, "prefill_stream", request)
            result = _streamed_result(call, chunks)
        try:
            return await asyncio.wait_for(result, self.prefill_timeout_s)
        except asyncio.CancelledError:
            cancel(call)
            raise
        except Exception as exc:  # dead replica, timeout, engine error: recompute here
            cancel(call)
            overloaded = getattr(exc, "cause", None) or exc
            if isinstance(overloaded, OverloadedError):
                raise overloaded from exc
            self._prefill_failed(request.request_id, exc)
            return None

    async def _accept_first_token(self, rid: str, result: PrefillResult) -> bool | None:
        """Give the engine the prefill worker's first token: True when the request goes on, False when the
        token ended it (its KV is then not needed), None when the engine refused it (recompute here)."""
        try:
            return await self.engine.call(lambda e: e.accept_first_token(
                rid, result.first_token, result.first_logprobs, num_cached_tokens=result.num_cached_tokens,
                sampler_state=result.sampler_state))
        except ValueError as exc:  # a worker whose model does not match ours: its token cannot be used
            self._prefill_failed(rid, exc)
            return None

    async def _fetch_kv(self, rid: str, handle: KVHandle,
                        chunks: StreamedKV | None) -> tuple[torch.Tensor | None, int]:
        """The prefill worker's KV, checked against this pool's layout, and the prompt tokens it holds: handle's
        export, after the chunks before it when streamed. (None, 0) when lost or corrupt (counted by the
        connector; the prompt is then computed here)."""
        start = time.monotonic()
        try:
            if chunks is not None:
                blocks, num_tokens = await chunks.finish(handle)
            else:
                blocks = await asyncio.to_thread(self.connector.fetch, handle, self.layout)
                num_tokens = handle.num_tokens
        except KVTransferError as exc:
            self._recompute_after(rid, exc, "KV transfer")
            return None, 0
        fetches = chunks.fetches if chunks is not None else [(time.monotonic() - start, handle.nbytes)]
        for seconds, nbytes in fetches:
            self.observe_transfer(seconds, nbytes)
        return blocks, num_tokens

    async def _import_kv(self, rid: str, blocks: torch.Tensor | None, num_tokens: int) -> None:
        """Queue the request with the fetched KV (num_tokens tokens) attached; without KV (none fetched, or the
        engine refused it) the prompt is computed here."""
        if blocks is not None:
            try:
                await self.engine.import_kv(rid, blocks, num_tokens)
            except ValueError as exc:  # a payload that does not fit this pool: still deferred
                self._refused_imports += 1
                self._recompute_after(rid, exc, "KV transfer")
            else:
                self._remote += 1
                return
        await self.engine.import_kv(rid)

    def _recompute_after(self, rid: str, exc: BaseException, what: str) -> None:
        """Count a request whose prompt is computed here because `what` failed for it."""
        self._recomputed += 1
        log.warning("%s of %s failed, recomputing locally: %r", what, rid, exc)

    def _prefill_failed(self, rid: str, exc: BaseException) -> None:
        self._prefill_failures += 1
        self._recompute_after(rid, exc, "prefill")

    def observe_transfer(self, seconds: float, nbytes: int) -> None:
        """Called once per successful KV fetch (seconds, bytes); a hook for metrics (the cluster layer
        records it)."""

    def _release_remote(self, export_id: str, owner: str) -> None:
        try:  # to the replica that holds it (owner); fire and forget: the lease is the backstop
            self.prefill_handle.release_kv.remote(export_id, owner)
        except Exception as exc:
            log.debug("release of %s not delivered: %r", export_id, exc)

    def _release_chunks(self, chunks: StreamedKV | None) -> None:
        """Release every chunk export received (fetched or not); a second call releases nothing."""
        for export_id, owner in chunks.close() if chunks is not None else ():
            self._release_remote(export_id, owner)

    def _stats(self, engine: EngineStats) -> DecodeStats:
        transfers = self.connector.stats
        return DecodeStats(self.worker_id, engine, transfers.bytes_fetched, transfers.fetch_seconds_total,
                           transfers.failures + self._refused_imports, self._prefill_failures, self._recomputed,
                           self._remote, self._local)

    def record_routing_stats(self) -> dict[str, float]:
        """For the KV-headroom router (Ray Serve polls this); a slightly stale value is fine for routing."""
        load = self.engine.load()
        return {"kv_free_blocks": float(load.kv_free_blocks), "kv_usage": load.kv_usage,
                "num_waiting": float(load.num_waiting)}


async def _streamed_result(call, chunks: StreamedKV) -> PrefillResult:
    """Read a prefill_stream call: each PrefillChunk starts its fetch (chunks.add), the PrefillResult ends it."""
    async for item in stream_items(call):
        if isinstance(item, PrefillChunk):
            chunks.add(item)
        else:
            return item
    raise RuntimeError("the prefill stream ended without a result")

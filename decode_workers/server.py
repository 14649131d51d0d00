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
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass

import ray

from decode_workers.token_stream import TokenStreamSender, TokenStreamTarget
from engine.async_engine import AsyncEngine
from engine.config import EngineConfig, SamplingParams
from engine.outputs import EngineStats
from kvtransfer import KVTransferConfig, KVTransferError, make_connector
from prefill_workers.protocol import PrefillRequest, PrefillResult

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DecodeStats:
    worker_id: str
    engine: EngineStats
    kv_transfer_bytes: int
    kv_transfer_seconds: float
    kv_transfer_failures: int
    prefill_failures: int
    recomputed_prefills: int
    remote_prefills: int


class DecodeServer:
    def __init__(self, engine_config: EngineConfig | dict | None = None,
                 transfer_config: KVTransferConfig | dict | None = None,
                 prefill=None, prefill_timeout_s: float = 60.0, worker_id: str | None = None,
                 dedup: bool = True) -> None:
        """prefill: a handle whose `.prefill.remote(PrefillRequest)` is awaitable (a Ray actor
        handle or a Serve DeploymentHandle), or None for colocated mode. dedup=False asks for
        every block even when this worker holds some (for measuring what dedup saves)."""
        self.engine = AsyncEngine(EngineConfig.coerce(engine_config))
        self.connector = make_connector(
            KVTransferConfig.coerce(transfer_config).for_node(ray.util.get_node_ip_address()))
        self.prefill_handle = prefill
        self.prefill_timeout_s = prefill_timeout_s
        self.dedup = dedup
        self.block_size = self.engine.engine.config.block_size
        self.layout = self.engine.engine.layout
        self.worker_id = worker_id or f"decode-{uuid.uuid4().hex[:8]}"
        self._bytes = 0
        self._seconds = 0.0
        self._transfer_failures = self._prefill_failures = self._recomputed = self._remote = 0
        self._token_streams = TokenStreamSender()

    async def generate(self, request: dict) -> AsyncIterator[dict]:
        """request: {"request_id"?, "prompt_token_ids", "sampling_params": dict | SamplingParams,
        "cache_salt"?}. Yields StepOutput dicts; raises ValueError for bad input before any output."""
        rid = request.get("request_id") or uuid.uuid4().hex
        params = request["sampling_params"]
        if not isinstance(params, SamplingParams):
            params = SamplingParams(**params)
        prompt = request["prompt_token_ids"]
        salt = request.get("cache_salt")
        if self.prefill_handle is None:
            async for out in self.engine.generate(prompt, params, rid, salt):
                yield asdict(out)
            return
        stream = self.engine.open_stream(rid)
        try:
            req = await self.engine.add_request(prompt, params, rid, salt, defer=True, reserve_prefix=self.dedup)
        except BaseException:
            self.engine.discard_stream(rid)
            raise
        finished = False
        try:
            async with contextlib.aclosing(self.engine.iterate(rid, stream)) as outputs:
                result = await self._remote_prefill(rid, req.prompt_token_ids, params, salt, req.num_computed_tokens)
                try:
                    continues = None if result is None else await self._accept_first_token(rid, result)
                    if continues is not None:  # out before the KV: the client has it a transfer sooner
                        first = await anext(outputs)
                        finished = first.finished
                        yield asdict(first)
                    if continues:
                        await self._import_kv(rid, result)
                finally:
                    if result is not None:
                        self._release_remote(result.kv.export_id, result.worker_id)
                # drop the export's handle (with the Ray transport, a reference to its object) now, not when
                # the request ends: the imported KV is in this pool
                result = None
                if not finished:
                    await self.engine.call(lambda e: e.enqueue(rid))
                    async for out in outputs:
                        finished = out.finished
                        yield asdict(out)
        finally:
            if not finished:  # consumer gone or prefill cancelled: free the blocks here now
                self.engine.discard_stream(rid)
                await self.engine.abort(rid)

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

    async def _remote_prefill(self, rid: str, prompt: list[int], params: SamplingParams, salt: str | None,
                              num_reserved: int) -> PrefillResult | None:
        """Prefill on a PrefillServer; None when that failed (the request is then computed here)."""
        skip = num_reserved // self.block_size
        call = self.prefill_handle.prefill.remote(PrefillRequest(rid, prompt, params, salt, skip))
        try:
            return await asyncio.wait_for(_awaitable(call), self.prefill_timeout_s)
        except asyncio.CancelledError:
            _cancel(call)
            raise
        except Exception as exc:  # dead replica, timeout, engine error: recompute here
            _cancel(call)
            self._prefill_failed(rid, exc)
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

    async def _import_kv(self, rid: str, result: PrefillResult) -> None:
        """Fetch the prefill worker's KV into this pool; on any failure leave the prompt to compute here."""
        handle = result.kv
        start = time.monotonic()
        try:
            blocks = await asyncio.to_thread(self.connector.fetch, handle, self.layout)
        except KVTransferError as exc:  # lost or corrupt
            self._transfer_failed(rid, exc)
            return
        elapsed = time.monotonic() - start
        try:
            await self.engine.call(lambda e: e.attach_kv(rid, blocks, handle.num_tokens))
        except ValueError as exc:  # a payload that does not fit this pool
            self._transfer_failed(rid, exc)
            return
        self._seconds += elapsed
        self._bytes += handle.nbytes
        self.observe_transfer(elapsed, handle.nbytes)
        self._remote += 1

    def _transfer_failed(self, rid: str, exc: BaseException) -> None:
        self._transfer_failures += 1
        self._recomputed += 1
        log.warning("KV transfer for %s failed, recomputing locally: %r", rid, exc)

    def _prefill_failed(self, rid: str, exc: BaseException) -> None:
        self._prefill_failures += 1
        self._recomputed += 1
        log.warning("prefill of %s failed, recomputing locally: %r", rid, exc)

    def observe_transfer(self, seconds: float, nbytes: int) -> None:
        """Called once per successful KV fetch; a hook for metrics (the cluster layer records it)."""

    def _release_remote(self, export_id: str, owner: str) -> None:
        try:  # to the replica that holds it (owner); fire and forget: the lease is the backstop
            self.prefill_handle.release_kv.remote(export_id, owner)
        except Exception as exc:
            log.debug("release of %s not delivered: %r", export_id, exc)

    async def stats(self) -> DecodeStats:
        engine_stats = await self.engine.call(lambda e: e.stats())
        return DecodeStats(self.worker_id, engine_stats, self._bytes, self._seconds, self._transfer_failures,
                           self._prefill_failures, self._recomputed, self._remote)

    def record_routing_stats(self) -> dict[str, float]:
        """For the KV-headroom router (Ray Serve polls this). Plain reads of counters the loop
        thread owns: a slightly stale value is fine for routing."""
        engine = self.engine.engine
        return {"kv_free_blocks": float(engine.kv.num_free_blocks), "kv_usage": engine.kv.usage,
                "num_waiting": float(len(engine.scheduler.waiting))}

    async def check_health(self) -> None:
        """Ray Serve's health probe: fail when the engine loop is dead or wedged (Serve then replaces the
        replica)."""
        problem = self.engine.health_problem()
        if problem is not None:
            raise RuntimeError(f"decode {problem}")

    async def abort(self, request_id: str) -> None:
        await self.engine.abort(request_id)

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown(timeout_s=1.0)


def _awaitable(call):
    """Ray ObjectRefs and Serve DeploymentResponses are both awaitable; wrap for wait_for."""
    async def wait():
        return await call
    return wait()


def _cancel(call) -> None:
    try:
        if isinstance(call, ray.ObjectRef):
            ray.cancel(call)
        else:
            call.cancel()
    except Exception as exc:  # already finished or the worker is gone
        log.debug("cancel failed: %r", exc)

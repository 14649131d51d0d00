"""PrefillServer: a prompt in, the first token and a handle to the prompt's KV out.

For each request: reserve the prompt's blocks already in this worker's pool,
fetch the longest further run from the cluster prefix directory instead of
computing it, prefill only the rest (chunked by the engine's token budget),
sample the first token, and export the blocks the caller does not hold under
a lease. Newly computed full blocks are published to the directory after the
reply, off the critical path.

A plain class: it runs as a Ray actor or as a Ray Serve deployment. The
directory is optional (None: prefix reuse stays per worker) and is reached by
name, so a restarted directory is found again. Whether it holds a prompt's
blocks is read from a local index that follows the directory's change feed
(prefill_workers/directory_client.py): no directory call on the request path
unless there is something to fetch.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace

import numpy as np
import ray
import torch

from engine.config import EngineConfig, SamplingParams
from engine.outputs import EngineStats, PrefillExport
from kvtransfer import KVHandle, KVTransferConfig
from prefill_workers.chunk_publisher import ChunkPublisher
from prefill_workers.directory_client import DirectoryClient
from prefill_workers.engine_worker import EngineWorker, WorkerStats
from prefill_workers.protocol import PrefillChunk, PrefillRequest, PrefillResult


@dataclass(frozen=True)
class PrefillStats(WorkerStats):
    exports_alive: int
    directory_blocks_fetched: int
    directory_blocks_published: int
    directory_errors: int
    directory_lookups: int = 0  # calls to the directory to fetch blocks its index listed
    directory_stale_blocks: int = 0  # blocks the index listed that the directory no longer held (computed)
    directory_index_entries: int = 0  # block hashes the local index lists
    kv_chunks_published: int = 0  # partial exports made while a prompt computed (prefill_stream)


class PrefillServer(EngineWorker):
    role = "prefill"

    def __init__(self, engine_config: EngineConfig | dict | None = None,
                 transfer_config: KVTransferConfig | dict | None = None,
                 directory: str | ray.actor.ActorHandle | None = None,
                 directory_namespace: str = "pdserve", worker_id: str | None = None) -> None:
        super().__init__(engine_config, transfer_config, worker_id)
        self.directory = None if directory is None else DirectoryClient(directory, directory_namespace)
        self._background: set[asyncio.Task] = set()
        self._reaper: asyncio.Task | None = None
        self._chunks_published = 0

    # ---- the request path ------------------------------------------------------------------------
    async def prefill(self, request: PrefillRequest) -> PrefillResult:
        """The first token and one export of the prompt's KV from request.skip_blocks on."""
        return await self._prefill(request, None)

    async def prefill_stream(self, request: PrefillRequest) -> AsyncIterator[PrefillChunk | PrefillResult]:
        """`prefill`, with the KV published while the prompt computes: yields a PrefillChunk per engine step
        that completed more full blocks (chunked prefill), then the PrefillResult, whose kv holds the rest.

        The caller owns each export once yielded. A caller that leaves before the result (cancelled, gone)
        aborts the prefill, and every export made for it, yielded or not, is released here.
        """
        chunks: asyncio.Queue[PrefillChunk | None] = asyncio.Queue()
        task = asyncio.ensure_future(self._prefill(request, chunks.put_nowait))
        task.add_done_callback(lambda _: chunks.put_nowait(None))
        handed: list[str] = []
        try:
            while (chunk := await chunks.get()) is not None:
                self._chunks_published += 1
                handed.append(chunk.kv.export_id)
                yield chunk
            result = task.result()  # the prefill's own error, if any (it freed its exports already)
            handed.append(result.kv.export_id)
            yield result
            handed = []  # all delivered: the caller's now
        finally:
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)  # its failure path frees the request
            for export_id in handed:
                self.connector.release(export_id)

    async def _prefill(self, request: PrefillRequest,
                       publish: Callable[[PrefillChunk], None] | None) -> PrefillResult:
        """Prefill one request; with `publish`, full blocks go out in chunks as they complete (ChunkPublisher)
        and the result's export starts after the last one. A failure or cancellation frees the request's
        blocks and every chunk export before it propagates."""
        self._ensure_background()
        start = time.monotonic()
        rid = request.request_id
        params = replace(request.sampling_params, n=1, max_tokens=1)
        stream = self.engine.open_stream(rid)
        try:
            req = await self.engine.add_request(request.prompt_token_ids, params, rid, request.cache_salt,
                                                hold_kv=True, defer=True, slo=request.slo,
                                                reject_past_s=request.reject_past_s)
        except BaseException:
            self.engine.discard_stream(rid)
            raise
        num_local = req.num_computed_tokens // self.block_size
        publisher = publishing = None
        try:
            num_from_directory = await self._import_from_directory(rid, req.num_prompt_tokens, num_local)
            if publish is not None:
                publisher = ChunkPublisher(self.engine, self.connector, self.layout, self.worker_id, rid,
                                           request.skip_blocks, publish)
                publishing = asyncio.ensure_future(publisher.run())
            async for _ in self.engine.iterate(rid, stream):
                pass  # one output, the first token: the request is then held, its blocks kept for the export
            if publishing is not None:
                await publishing  # ends at once: the request is held now (no longer unfinished)
            skip = request.skip_blocks if publisher is None else max(request.skip_blocks, publisher.next_block)
            # the engine frees the held blocks in this call, whatever happens to the caller afterwards
            export = await self.engine.finish_prefill(rid, skip)
            handle = await self._export(rid, export)
        except BaseException:  # cancelled (the caller gave up) or failed: free what the request holds
            self.engine.discard_stream(rid)
            if self.engine.alive:
                await self.engine.abort(rid)
            if publishing is not None:  # the abort ends it; not cancelled, so no export is lost mid-way
                await asyncio.gather(publishing, return_exceptions=True)
                publisher.release_all()
            raise
        num_cached = (num_local + num_from_directory) * self.block_size
        # Publish on reuse: only the blocks this worker found in its own cache, i.e. prefixes seen at
        # least twice. A prompt's unique blocks would cost a copy into the object store and engine time
        # for nothing: nobody else asks for them (measured: BENCHMARKS.md, prefix cache off vs on).
        if self.directory is not None:
            self._spawn(self.directory.offer(export.block_hashes[:num_local], self._read_cached_blocks))
        return PrefillResult(
            request_id=rid, first_token=export.first_token, first_logprobs=export.first_logprobs,
            num_cached_tokens=num_cached, num_computed_tokens=req.num_prompt_tokens - num_cached,
            kv=handle, worker_id=self.worker_id, prefill_seconds=time.monotonic() - start,
            sampler_state=export.sampler_state,
        )

    async def release_kv(self, export_id: str, owner: str | None = None) -> bool:
        """The decode side fetched an export (or gave up on it): free it now rather than at lease end.
        owner: the worker_id of the result that named the export; the prefill router sends the call to
        that replica by it."""
        return self.connector.release(export_id)

    async def warm_prefix(self, prompt_token_ids: list[int], cache_salt: str | None = None,
                          pin: bool = True) -> int:
        """Compute a prompt's full blocks once and publish them to the directory (pinned: never evicted).

        Returns how many blocks the directory holds for it afterwards.
        """
        rid = f"warm-{uuid.uuid4().hex[:12]}"
        request = PrefillRequest(rid, list(prompt_token_ids), SamplingParams(temperature=0.0, max_tokens=1),
                                 cache_salt)
        result = await self.prefill(request)
        self.connector.release(result.kv.export_id)
        if self.directory is None:
            return 0
        hashes = list(result.kv.block_hashes)
        await self.directory.offer(hashes, self._read_cached_blocks)  # all: a warmed prompt is shared
        return await self.directory.pin(hashes) if pin else self.directory.index.leading_run(hashes)

    # ---- introspection -----------------------------------------------------------------------------
    def _stats(self, engine: EngineStats) -> PrefillStats:
        d = self.directory
        if d is None:
            return PrefillStats(self.worker_id, engine, self.connector.num_exports, 0, 0, 0,
                                kv_chunks_published=self._chunks_published)
        return PrefillStats(self.worker_id, engine, self.connector.num_exports, d.fetched, d.published,
                            d.errors, d.lookups, d.stale, len(d.index), self._chunks_published)

    def shutdown(self, timeout_s: float = 5.0) -> None:
        if self.directory is not None:
            self.directory.close()
        super().shutdown(timeout_s)

    async def reap_expired(self) -> int:
        return self.connector.reap_expired()

    # ---- helpers -----------------------------------------------------------------------------------
    async def _import_from_directory(self, rid: str, num_prompt_tokens: int, num_local: int) -> int:
        """Queue the deferred request with the longest run of directory blocks after its num_local local
        ones attached (none: it computes them). Returns the blocks attached."""
        d = self.directory
        # Full blocks the engine may take from elsewhere: the last prompt token is always computed.
        if d is not None and num_local < (num_prompt_tokens - 1) // self.block_size \
                and await d.synced() and len(d.index):
            hashes = await self.engine.call(lambda e: e.requests[rid].full_block_hashes(
                self.block_size, num_prompt_tokens - 1)[num_local:])
            arrays = await d.fetch(hashes)
            if arrays:
                blocks = torch.from_numpy(np.concatenate(arrays, axis=2)).view(self.engine.info.kv_dtype)
                n = blocks.shape[2]
                try:
                    await self.engine.import_kv(rid, blocks, n * self.block_size,
                                                num_cached_tokens=(num_local + n) * self.block_size)
                except ValueError as exc:  # blocks that do not fit this pool: still deferred, compute them
                    d.failed(exc, "blocks refused, computing instead")
                else:
                    d.fetched += n
                    return n
        await self.engine.import_kv(rid)
        return 0

    async def _export(self, rid: str, export: PrefillExport) -> KVHandle:
        """Stage a finished prefill's blocks for the caller (under the connector's lease); its handle."""
        return await asyncio.to_thread(
            self.connector.export, rid, export.blocks, self.layout, first_block=export.first_block,
            num_tokens=export.num_tokens, block_hashes=export.block_hashes[export.first_block:])

    async def _read_cached_blocks(self, hashes: list[bytes]) -> np.ndarray:
        """The K/V of a leading run of hashes from this worker's prefix cache, as the directory stores it."""
        return _as_numpy(await self.engine.call(lambda e: e.read_cached_blocks(hashes)))

    def _spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _ensure_background(self) -> None:
        """The lease reaper and the directory's change feed (started from the first request: they need
        the replica's event loop)."""
        if self._reaper is None or self._reaper.done():
            self._reaper = asyncio.ensure_future(self._reap_loop())
        if self.directory is not None:
            self.directory.follow()

    async def _reap_loop(self) -> None:
        period = max(0.05, min(1.0, self.connector.config.lease_s / 4))
        while True:
            await asyncio.sleep(period)
            self.connector.reap_expired()


def _as_numpy(t: torch.Tensor) -> np.ndarray:
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16: move the same bytes as int16
        return t.view(torch.int16).numpy()
    return t.numpy()

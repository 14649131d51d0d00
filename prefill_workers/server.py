"""PrefillServer: a prompt in, the first token and a handle to the prompt's KV out.

For each request: reserve the prompt's blocks already in this worker's pool,
fetch the longest further run from the cluster prefix directory instead of
computing it, prefill only the rest (chunked by the engine's token budget),
sample the first token, and export the blocks the caller does not hold under
a lease. Newly computed full blocks are published to the directory after the
reply, off the critical path.

A plain class: it runs as a Ray actor or as a Ray Serve deployment. The
directory is optional (None: prefix reuse stays per worker) and is reached by
name, so a restarted directory is found again.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass, replace

import numpy as np
import ray
import torch

from engine.config import EngineConfig, SamplingParams
from engine.outputs import EngineStats, PrefillExport
from kvtransfer import KVHandle, KVTransferConfig
from prefill_workers.engine_worker import EngineWorker, WorkerStats
from prefill_workers.protocol import PrefillRequest, PrefillResult

log = logging.getLogger(__name__)


# The directory is an optimisation: a slow or dead one may cost a request at most this much TTFT before
# the worker computes the blocks itself (seconds; a healthy lookup takes milliseconds).
DIRECTORY_LOOKUP_TIMEOUT_S = 1.0
DIRECTORY_PUBLISH_TIMEOUT_S = 10.0  # in the background, after the request: bounds the tasks a hang leaves
DIRECTORY_RETRY_S = 1.0  # after a failure, how long before the directory's handle is looked up again


@dataclass(frozen=True)
class PrefillStats(WorkerStats):
    exports_alive: int
    directory_blocks_fetched: int
    directory_blocks_published: int
    directory_errors: int


class PrefillServer(EngineWorker):
    role = "prefill"

    def __init__(self, engine_config: EngineConfig | dict | None = None,
                 transfer_config: KVTransferConfig | dict | None = None,
                 directory: str | ray.actor.ActorHandle | None = None,
                 directory_namespace: str = "pdserve", worker_id: str | None = None) -> None:
        super().__init__(engine_config, transfer_config, worker_id)
        self._directory_ref = directory
        self._directory_namespace = directory_namespace
        self._directory_handle = None  # the named directory's handle, looked up once and kept until it fails
        self._directory_retry_at = 0.0  # monotonic seconds: no new lookup before (a GCS outage costs one per period)
        self._fetched = self._published = self._directory_errors = 0
        self._pinned: set[bytes] = set()  # hashes this worker warmed: re-pinned if the directory restarts
        self._background: set[asyncio.Task] = set()
        self._reaper: asyncio.Task | None = None

    # ---- the request path ------------------------------------------------------------------------
    async def prefill(self, request: PrefillRequest) -> PrefillResult:
        self._ensure_reaper()
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
        try:
            num_from_directory = await self._import_from_directory(rid, req.num_prompt_tokens, num_local)
            async for _ in self.engine.iterate(rid, stream):
                pass  # one output, the first token: the request is then held, its blocks kept for the export
            # the engine frees the held blocks in this call, whatever happens to the caller afterwards
            export = await self.engine.finish_prefill(rid, request.skip_blocks)
        except BaseException:  # cancelled (the caller gave up) or failed: free what the request holds
            self.engine.discard_stream(rid)
            if self.engine.alive:
                await self.engine.abort(rid)
            raise
        num_cached = (num_local + num_from_directory) * self.block_size
        handle = await self._export(rid, export)
        # Publish on reuse: only the blocks this worker found in its own cache, i.e. prefixes seen at
        # least twice. A prompt's unique blocks would cost a copy into the object store and engine time
        # for nothing: nobody else asks for them (measured: BENCHMARKS.md, prefix cache off vs on).
        self._spawn(self._publish(export.block_hashes[:num_local]))
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
        directory = self._directory()
        if directory is None:
            return 0
        hashes = list(result.kv.block_hashes)
        if pin:
            self._pinned.update(hashes)
        await self._publish(hashes)  # all of them: a warmed prompt is shared by definition
        if pin:
            await directory.pin.remote(hashes)
        return await directory.contains.remote(hashes)

    # ---- introspection -----------------------------------------------------------------------------
    def _stats(self, engine: EngineStats) -> PrefillStats:
        return PrefillStats(self.worker_id, engine, self.connector.num_exports, self._fetched,
                            self._published, self._directory_errors)

    async def reap_expired(self) -> int:
        return self.connector.reap_expired()

    # ---- helpers -----------------------------------------------------------------------------------
    async def _import_from_directory(self, rid: str, num_prompt_tokens: int, num_local: int) -> int:
        """Queue the deferred request with the longest run of directory blocks after its num_local local
        ones attached (none: it computes them). Returns the blocks attached."""
        directory = self._directory()
        # Full blocks the engine may take from elsewhere: the last prompt token is always computed.
        if directory is not None and num_local < (num_prompt_tokens - 1) // self.block_size:
            hashes = await self.engine.call(lambda e: e.requests[rid].full_block_hashes(
                self.block_size, num_prompt_tokens - 1)[num_local:])
            blocks = await self._fetch_from_directory(directory, hashes)
            if blocks is not None:
                n = blocks.shape[2]
                try:
                    await self.engine.import_kv(rid, blocks, n * self.block_size,
                                                num_cached_tokens=(num_local + n) * self.block_size)
                except ValueError as exc:  # blocks that do not fit this pool: still deferred, compute them
                    self._directory_failed(exc, "blocks refused, computing instead")
                else:
                    self._fetched += n
                    return n
        await self.engine.import_kv(rid)
        return 0

    async def _fetch_from_directory(self, directory, hashes: list[bytes]) -> torch.Tensor | None:
        """The directory's blocks for the longest known run of hashes, or None: it has none, or failed
        (counted; the directory is an optimisation, the worker computes the blocks instead)."""
        try:
            refs, arrays = await asyncio.wait_for(self._lookup(directory, hashes), DIRECTORY_LOOKUP_TIMEOUT_S)
            if not refs:
                return None
            return torch.from_numpy(np.concatenate(arrays, axis=2)).view(self.engine.info.kv_dtype)
        except Exception as exc:
            self._directory_failed(exc, "fetch failed, computing instead")
            return None

    @staticmethod
    async def _lookup(directory, hashes: list[bytes]) -> tuple[list, list[np.ndarray]]:
        """The directory's refs for the longest known run of hashes, and their arrays."""
        refs = await directory.lookup.remote(hashes)
        return refs, (await asyncio.gather(*refs) if refs else [])

    def _directory_failed(self, exc: BaseException, what: str) -> None:
        """Count a failed directory call and forget the handle: the next call looks the directory up again
        (it may have restarted), but not before DIRECTORY_RETRY_S."""
        self._directory_errors += 1
        self._directory_handle = None
        self._directory_retry_at = time.monotonic() + DIRECTORY_RETRY_S
        log.warning("prefix directory %s: %r", what, exc)

    async def _export(self, rid: str, export: PrefillExport) -> KVHandle:
        """Stage a finished prefill's blocks for the caller (under the connector's lease); its handle."""
        return await asyncio.to_thread(
            self.connector.export, rid, export.blocks, self.layout, first_block=export.first_block,
            num_tokens=export.num_tokens, block_hashes=export.block_hashes[export.first_block:])

    async def _publish(self, hashes: list[bytes]) -> None:
        """Offer a run of a prompt's full blocks (from its first) to the directory: it gets the ones it
        lacks (it owns them from then on), read from this worker's prefix cache. Blocks already known are
        offered again: after a directory restart this is how it is refilled (and warmed prompts re-pinned)."""
        directory = self._directory()
        if directory is None or not hashes:
            return
        try:
            await asyncio.wait_for(self._offer(directory, hashes), DIRECTORY_PUBLISH_TIMEOUT_S)
        except Exception as exc:
            self._directory_failed(exc, "publish failed")

    async def _offer(self, directory, hashes: list[bytes]) -> None:
        """_publish's calls: the blocks the directory lacks, then the pins it lost."""
        known = await directory.contains.remote(hashes)
        if known == len(hashes):
            return
        blocks = await self.engine.call(lambda e: e.read_cached_blocks(hashes[known:]))
        n = blocks.shape[2]
        if n:
            await directory.publish.remote(hashes[known:known + n], _as_numpy(blocks), False)
            self._published += n
        repin = [h for h in hashes[known:known + n] if h in self._pinned]
        if repin:  # the directory restarted and lost its pins
            await directory.pin.remote(repin)

    def _directory(self):
        ref = self._directory_ref
        if ref is None or not isinstance(ref, str):
            return ref
        if self._directory_handle is None and time.monotonic() >= self._directory_retry_at:
            try:
                self._directory_handle = ray.get_actor(ref, namespace=self._directory_namespace)
            except ValueError:  # not running (yet, or restarting): serve without it for a while
                self._directory_retry_at = time.monotonic() + DIRECTORY_RETRY_S
        return self._directory_handle

    def _spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _ensure_reaper(self) -> None:
        if self._reaper is None or self._reaper.done():
            self._reaper = asyncio.ensure_future(self._reap_loop())

    async def _reap_loop(self) -> None:
        period = max(0.05, min(1.0, self.connector.config.lease_s / 4))
        while True:
            await asyncio.sleep(period)
            self.connector.reap_expired()


def _as_numpy(t: torch.Tensor) -> np.ndarray:
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16: move the same bytes as int16
        return t.view(torch.int16).numpy()
    return t.numpy()

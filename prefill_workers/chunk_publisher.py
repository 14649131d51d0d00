"""ChunkPublisher: a running prefill's finished blocks exported as they complete, not after the whole prompt.

A long prompt is prefilled in chunks (the engine's token budget, max_num_batched_tokens, splits it).
After each engine step (AsyncEngine.after_step: no polling) the publisher asks the engine how many
full prompt blocks of the request are computed; when the step completed more, it copies them out
(Engine.read_request_blocks: the request keeps its blocks, so nothing is freed before finish_prefill)
and exports them under the connector's lease as one PrefillChunk, handed to `publish`. The caller
fetches them while later chunks compute.

It stops by itself once the request is no longer unfinished: its last prompt token computed and the
first token sampled (the engine then holds it for finish_prefill), or aborted. The request's last
prompt token is computed by that final step, never before, so the final export, from `next_block` on,
always holds at least the last block. An export that fails ends publishing early; the final export
then simply starts earlier. Units: blocks and seconds.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import torch

from engine.async_engine import AsyncEngine
from engine.engine import Engine
from engine.kv_cache import KVLayout
from kvtransfer import KVConnector, KVTransferError
from prefill_workers.protocol import PrefillChunk

log = logging.getLogger(__name__)

_NOTHING_NEW = ()


class ChunkPublisher:
    def __init__(self, engine: AsyncEngine, connector: KVConnector, layout: KVLayout, worker_id: str,
                 request_id: str, first_block: int, publish: Callable[[PrefillChunk], None]) -> None:
        """first_block: the first block to publish (the caller holds those before it: skip_blocks)."""
        self.engine, self.connector, self.layout = engine, connector, layout
        self.worker_id, self.request_id = worker_id, request_id
        self.next_block = first_block  # the first block not published yet
        self.export_ids: list[str] = []  # every export published, in order
        self._publish = publish

    async def run(self) -> None:
        """Publish each newly completed run of full blocks until the request is no longer unfinished."""
        while True:
            got = await self.engine.after_step(self._read_new)
            if got is None:
                return
            if got is not _NOTHING_NEW and not await self._export(*got):
                return

    def release_all(self) -> None:
        """Free every export published (a failed or abandoned prefill): idempotent, fetched ones are no-ops."""
        for export_id in self.export_ids:
            self.connector.release(export_id)

    def _read_new(self, engine: Engine) -> tuple[torch.Tensor, list[bytes], int] | tuple[()] | None:
        """On the engine thread: the newly computed full blocks (a copy), their hashes and the block after
        them; _NOTHING_NEW; or None when the request is no longer unfinished."""
        done = engine.computed_prompt_blocks(self.request_id)
        if done is None:
            return None
        if done <= self.next_block:
            return _NOTHING_NEW
        req = engine.requests[self.request_id]
        hashes = req.full_block_hashes(self.layout.block_size, done * self.layout.block_size)[self.next_block:done]
        return engine.read_request_blocks(self.request_id, self.next_block, done), hashes, done

    async def _export(self, blocks: torch.Tensor, hashes: list[bytes], end_block: int) -> bool:
        """Export blocks [next_block, end_block) and publish them; False when the export failed."""
        try:
            handle = await asyncio.to_thread(
                self.connector.export, self.request_id, blocks, self.layout, first_block=self.next_block,
                num_tokens=(end_block - self.next_block) * self.layout.block_size, block_hashes=hashes)
        except (KVTransferError, ValueError) as exc:  # the final export carries these blocks instead
            log.warning("chunk export of %s failed, the rest goes in one export: %r", self.request_id, exc)
            return False
        self.export_ids.append(handle.export_id)
        self.next_block = end_block
        self._publish(PrefillChunk(self.request_id, handle, self.worker_id))
        return True

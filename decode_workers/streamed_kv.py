"""StreamedKV: one request's KV received in chunks while its prefill still runs (PrefillServer.prefill_stream).

Each PrefillChunk's export is fetched in the background as soon as its handle arrives, one fetch after
another in arrival order, and copied into one buffer of the whole payload. When the prefill's result comes,
only its own export (the blocks the last prefill step completed) is fetched on the request's path, and the
buffer goes to the engine in one import, as a whole-prompt export would.

Invariants: the chunks cover consecutive blocks from the first chunk's first_block, and the result's export
starts where the last chunk ended and ends at the prompt's last block; anything else is a KVLayoutError
(the caller then computes the prompt itself). A failed fetch fails every fetch after it and `finish`.
`close` names every chunk export exactly once for release, whatever happened to it (the Ray transport frees
an export only when released; the gRPC one when fetched, and a release after that is a no-op).
Units: blocks, bytes and seconds.
"""

from __future__ import annotations

import asyncio
import time

import torch

from engine.kv_cache import DTYPES, KVLayout
from kvtransfer import KVConnector, KVHandle, KVLayoutError
from prefill_workers.protocol import PrefillChunk


class StreamedKV:
    def __init__(self, connector: KVConnector, layout: KVLayout, num_prompt_tokens: int) -> None:
        self.connector, self.layout = connector, layout
        self.end_block = -(-num_prompt_tokens // layout.block_size)  # one past the prompt's last block
        self.num_prompt_tokens = num_prompt_tokens
        self.fetches: list[tuple[float, int]] = []  # (seconds, bytes) of each fetch that succeeded
        self._owners: list[tuple[str, str]] = []  # (export_id, owner worker id) of every chunk received
        self._buffer: torch.Tensor | None = None  # blocks [_first, end_block), filled as fetches land
        self._first = self._next = 0  # the buffer's first block; the next block a chunk must start at
        self._tasks: list[asyncio.Task] = []
        self._error: KVLayoutError | None = None

    def add(self, chunk: PrefillChunk) -> None:
        """Start fetching a chunk in the background, after the chunks before it."""
        kv = chunk.kv
        self._owners.append((kv.export_id, chunk.worker_id))
        if self._error is not None:
            return
        if self._buffer is None:
            self._first = self._next = kv.first_block
            self._buffer = torch.empty(self.layout.blocks_shape(max(1, self.end_block - kv.first_block)),
                                       dtype=DTYPES[self.layout.dtype])
        if kv.first_block != self._next or kv.first_block + kv.shape[2] >= self.end_block:
            self._error = KVLayoutError(f"chunk {kv.export_id} holds blocks [{kv.first_block}, "
                                        f"{kv.first_block + kv.shape[2]}), expected from {self._next} before "
                                        f"{self.end_block}")
            return
        self._chain(kv)

    async def finish(self, final: KVHandle) -> tuple[torch.Tensor, int]:
        """The whole payload, every chunk and the final export, and the prompt tokens it holds. Raises
        KVTransferError when a fetch failed or the exports do not line up."""
        if self._buffer is None:  # no chunk came (a prompt of one step): one plain fetch
            self._chain(final, buffered=False)
            return await self._tasks[-1], final.num_tokens
        if self._error is not None:
            raise self._error
        if final.first_block != self._next or final.first_block + final.shape[2] != self.end_block:
            raise KVLayoutError(f"final export {final.export_id} holds blocks [{final.first_block}, "
                                f"{final.first_block + final.shape[2]}), expected [{self._next}, {self.end_block})")
        self._chain(final)
        await self._tasks[-1]
        return self._buffer, self.num_prompt_tokens - self._first * self.layout.block_size

    def close(self) -> list[tuple[str, str]]:
        """Stop waiting on fetches in flight; the (export_id, owner) of every chunk received, to release."""
        for task in self._tasks:
            if task.done() and not task.cancelled():
                task.exception()  # retrieved: a failure already counted needs no "never retrieved" log
            task.cancel()
        owners, self._owners = self._owners, []
        return owners

    def _chain(self, handle: KVHandle, buffered: bool = True) -> None:
        previous = self._tasks[-1] if self._tasks else None
        offset = handle.first_block - self._first
        self._tasks.append(asyncio.ensure_future(self._fetch_after(previous, handle, offset if buffered else None)))
        self._next = handle.first_block + handle.shape[2]

    async def _fetch_after(self, previous: asyncio.Task | None, handle: KVHandle,
                           offset: int | None) -> torch.Tensor:
        if previous is not None:
            await previous  # in order, one at a time; its failure is ours
        return await asyncio.to_thread(self._fetch, handle, offset)

    def _fetch(self, handle: KVHandle, offset: int | None) -> torch.Tensor:
        """On a worker thread: fetch one export (into the buffer at block offset, unless None)."""
        start = time.monotonic()
        blocks = self.connector.fetch(handle, self.layout)
        if offset is not None:
            # copied while the prefill runs, so the one import needs no concatenation on the request's path
            self._buffer[:, :, offset:offset + blocks.shape[2]].copy_(blocks)
        self.fetches.append((time.monotonic() - start, handle.nbytes))
        return blocks if offset is None else self._buffer

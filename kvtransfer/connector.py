"""KVConnector: the one interface every KV transport implements.

The exporting side stages a payload under a lease and returns a KVHandle; the
importing side fetches it with the handle, checks it, and gets a tensor back.
This base class owns everything that is the same for every transport:

- running the payload checks (kvtransfer.payload) on the blocks given to export(), on the handle
  given to fetch() and on the bytes it receives;
- the staging area: export_id -> StagedExport, guarded by one lock because the
  engine worker's thread and transport threads (gRPC server) both touch it;
- leases: an export not released within config.lease_s seconds is freed by
  reap_expired(), called lazily on every export() and periodically by workers;
- fault injection (config.fault): "corrupt", "truncate" and "wrong_layout" are
  applied here, on the exporting side, to what is served, so the importer's
  real checks catch them; "timeout" is transport-specific (see each transport).

Units: bytes and seconds; lease times are wall clock (time.time()).
"""

from __future__ import annotations

import dataclasses
import threading
import time
import uuid
import zlib
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from engine.kv_cache import KVLayout
from kvtransfer.config import KVTransferConfig
from kvtransfer.errors import KVTransferError
from kvtransfer.handle import KVHandle
from kvtransfer.payload import byte_view, check_handle, check_payload, payload_to_tensor


@dataclass
class TransferStats:
    """Counters of one connector since it was made (a snapshot when read through .stats).

    bytes_exported / exports: payloads staged by export().
    bytes_fetched / fetches / fetch_seconds_total: successful fetch() calls.
    failures: fetch() calls that raised a KVTransferError.
    released: exports freed by release() or by being served in full ("freed when fetched").
    expired: exports freed because their lease passed.
    """

    bytes_exported: int = 0
    bytes_fetched: int = 0
    exports: int = 0
    fetches: int = 0
    failures: int = 0
    released: int = 0
    expired: int = 0
    fetch_seconds_total: float = 0.0


@dataclass
class StagedExport:
    """One live export on the exporting side. `stored` is whatever the transport keeps to serve it."""

    handle: KVHandle
    stored: Any
    nbytes: int
    expires_at: float


class KVConnector(ABC):
    """Export / fetch / release of KV blocks over one transport. See the module docstring for invariants.

    Subclasses implement _stage (make an export servable), _fetch_payload (get
    the raw bytes of a handle within config.timeout_s), and may override
    _on_free (called once per export when it leaves staging) and _close.
    """

    transport: str = ""

    def __init__(self, config: KVTransferConfig) -> None:
        self.config = config
        self._lock = threading.Lock()
        self._staged: dict[str, StagedExport] = {}
        self._bytes_staged = 0
        self._stats = TransferStats()
        self._closed = False

    # ---- exporting side -------------------------------------------------------------------------------

    def export(self, request_id: str, blocks: torch.Tensor, layout: KVLayout, *, first_block: int,
               num_tokens: int, block_hashes: Sequence[bytes]) -> KVHandle:
        """Stage `blocks` under a lease of config.lease_s seconds and return the handle to fetch them.

        blocks: CPU, contiguous, dtype layout.dtype, shape (L, 2, n, block_size, Hkv, D), n >= 1.
        The connector may keep a reference instead of a copy: do not modify blocks afterwards
        (PagedKVCache.read_blocks returns a fresh copy). Raises KVLayoutError if blocks do not fit
        the layout, ValueError for other bad arguments, KVTransferError if the payload is too large.
        """
        if self._closed:
            raise KVTransferError("connector is closed")
        self.reap_expired()
        raw = self._check_blocks(request_id, blocks, layout, first_block, num_tokens, block_hashes)
        nbytes = raw.nbytes
        expires_at = time.time() + self.config.lease_s
        handle = KVHandle(
            request_id=request_id, export_id=uuid.uuid4().hex, transport=self.transport, locator="",
            layout=self._advertised_layout(layout), dtype=layout.dtype, shape=tuple(blocks.shape),
            first_block=first_block, num_tokens=num_tokens, block_hashes=tuple(bytes(h) for h in block_hashes),
            checksum=zlib.crc32(raw), nbytes=nbytes, lease_expires_at=expires_at,
        )
        # The checksum above is of the true bytes; a fault changes only what is served.
        handle, stored = self._stage(handle, self._served_bytes(raw))
        entry = StagedExport(handle, stored, nbytes, expires_at)
        with self._lock:
            closed = self._closed  # close() may have run on another thread meanwhile
            if not closed:
                self._staged[handle.export_id] = entry
                self._bytes_staged += nbytes
                self._stats.exports += 1
                self._stats.bytes_exported += nbytes
        if closed:
            self._on_free(entry)
            raise KVTransferError("connector is closed")
        return handle

    def release(self, export_id: str) -> bool:
        """Free a staged export. Idempotent: True if something was freed, False if it was already gone."""
        return self._free(export_id)

    def reap_expired(self, now: float | None = None) -> int:
        """Free every export whose lease ended at or before `now` (wall-clock seconds; default time.time())."""
        now = time.time() if now is None else now
        with self._lock:
            gone = [self._pop_locked(eid) for eid, e in list(self._staged.items()) if e.expires_at <= now]
            self._stats.expired += len(gone)
        for entry in gone:
            self._on_free(entry)
        return len(gone)

    @property
    def num_exports(self) -> int:
        """Staged exports alive on this (exporting) side."""
        with self._lock:
            return len(self._staged)

    @property
    def bytes_staged(self) -> int:
        """Payload bytes held by live exports."""
        with self._lock:
            return self._bytes_staged

    @property
    def stats(self) -> TransferStats:
        """A snapshot of the counters."""
        with self._lock:
            return dataclasses.replace(self._stats)

    def close(self) -> None:
        """Free every staged export and stop transport resources. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            gone = [self._pop_locked(eid) for eid in list(self._staged)]
        for entry in gone:
            self._on_free(entry)
        self._close()

    def __enter__(self) -> KVConnector:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- importing side -------------------------------------------------------------------------------

    def fetch(self, handle: KVHandle, expected: KVLayout) -> torch.Tensor:
        """Fetch an export's blocks, checked against `expected`, within config.timeout_s seconds.

        Returns a CPU tensor shaped handle.shape in expected.dtype, bit-identical to what was exported.
        Raises KVLayoutError, KVCorruptError, KVTimeoutError or KVNotFoundError (all KVTransferError).
        """
        start = time.perf_counter()
        try:
            if handle.transport != self.transport:
                raise KVTransferError(f"handle of transport {handle.transport!r} given to a {self.transport} connector")
            check_handle(handle, expected, self.config.max_payload_bytes)
            tensor = payload_to_tensor(handle, self._fetch_payload(handle))
        except KVTransferError:
            with self._lock:
                self._stats.failures += 1
            raise
        with self._lock:
            self._stats.fetches += 1
            self._stats.bytes_fetched += handle.nbytes
            self._stats.fetch_seconds_total += time.perf_counter() - start
        return tensor

    # ---- for subclasses ------------------------------------------------------------------------------

    @abstractmethod
    def _stage(self, handle: KVHandle, payload: np.ndarray) -> tuple[KVHandle, Any]:
        """Make `payload` (uint8, possibly faulty) servable; return the handle with locator/object_ref set
        and what to keep in staging. Runs outside the lock."""

    @abstractmethod
    def _fetch_payload(self, handle: KVHandle) -> np.ndarray:
        """The raw bytes served for `handle` (1-D uint8, may be read-only), within config.timeout_s.

        Map every transport error to a KVTransferError subclass."""

    def _on_free(self, entry: StagedExport) -> None:
        """Called once, outside the lock, when an export leaves staging."""
        return None  # default: nothing beyond dropping the entry

    def _close(self) -> None:
        """Stop transport resources (servers, channels)."""
        return None  # default: the transport holds no resources

    def _lookup(self, export_id: str) -> StagedExport | None:
        """The live export, or None if unknown, released, or its lease passed (then it is freed now)."""
        with self._lock:
            entry = self._staged.get(export_id)
            if entry is None or entry.expires_at > time.time():
                return entry
            self._pop_locked(export_id)
            self._stats.expired += 1
        self._on_free(entry)
        return None

    def _free(self, export_id: str) -> bool:
        """Free an export by release() or after it was served in full; counted as released."""
        with self._lock:
            if export_id not in self._staged:
                return False
            entry = self._pop_locked(export_id)
            self._stats.released += 1
        self._on_free(entry)
        return True

    # ---- internals -----------------------------------------------------------------------------------

    def _pop_locked(self, export_id: str) -> StagedExport:
        entry = self._staged.pop(export_id)
        self._bytes_staged -= entry.nbytes
        return entry

    def _check_blocks(self, request_id: str, blocks: torch.Tensor, layout: KVLayout, first_block: int,
                      num_tokens: int, block_hashes: Sequence[bytes]) -> np.ndarray:
        """export()'s arguments against check_payload's invariants; the blocks' raw bytes."""
        if not isinstance(blocks, torch.Tensor) or blocks.device.type != "cpu" or not blocks.is_contiguous():
            raise ValueError("blocks must be a contiguous CPU tensor")
        if not all(isinstance(h, bytes) for h in block_hashes):
            raise ValueError("block_hashes must be bytes")
        raw = byte_view(blocks)
        dtype = str(blocks.dtype).removeprefix("torch.")  # torch.float32 -> "float32", as layouts name it
        check_payload(f"blocks of request {request_id}", layout, dtype, blocks.shape, raw.nbytes,
                      num_tokens=num_tokens, first_block=first_block, num_hashes=len(block_hashes),
                      max_payload_bytes=self.config.max_payload_bytes, misfit=ValueError)
        return raw

    def _advertised_layout(self, layout: KVLayout) -> dict:
        advertised = layout.to_dict()
        if self.config.fault == "wrong_layout":
            advertised["block_size"] *= 2
        return advertised

    def _served_bytes(self, raw: np.ndarray) -> np.ndarray:
        if self.config.fault == "corrupt":
            bad = raw.copy()  # never touch the caller's tensor
            bad[0] ^= 0xFF
            bad[bad.size // 2] ^= 0x01
            return bad
        if self.config.fault == "truncate":
            return raw[: raw.size - max(1, raw.size // 8)]
        return raw

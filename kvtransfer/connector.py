"""KVConnector: the one interface every KV transport implements.

The exporting side stages a payload under a lease and returns a KVHandle; the
importing side fetches it with the handle, checks it, and gets a tensor back.
This base class owns everything that is the same for every transport:

- one check of a payload's invariants (check_payload: layout, dtype, shape, sizes), run on the blocks
  given to export() and on the handle given to fetch(), and a check of the bytes received (size, CRC-32);
- the staging area: export_id -> StagedExport, guarded by one lock because the
  engine worker's thread and transport threads (gRPC server) both touch it;
- leases: an export not released within config.lease_s seconds is freed by
  reap_expired(), called lazily on every export() and periodically by workers;
- fault injection (config.fault): "corrupt", "truncate" and "wrong_layout" are
  applied here, on the exporting side, to what is served, so the importer's
  real checks catch them; "timeout" is transport-specific (see each transport).

Payloads are raw bytes: the C-contiguous bytes of the blocks tensor
[num_layers, 2, n, block_size, num_kv_heads, head_dim] in layout.dtype. Units:
bytes and seconds; lease times are wall clock (time.time()).
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

from engine.kv_cache import DTYPES, KVLayout
from kvtransfer.config import KVTransferConfig
from kvtransfer.errors import KVCorruptError, KVLayoutError, KVTransferError
from kvtransfer.handle import KVHandle


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


def byte_view(blocks: torch.Tensor) -> np.ndarray:
    """The raw bytes of a contiguous CPU tensor as a 1-D uint8 numpy array, without copying."""
    return blocks.detach().reshape(-1).view(torch.uint8).numpy()


def check_payload(what: str, layout: KVLayout, dtype: str, shape: Sequence[int], nbytes: int, *, num_tokens: int,
                  first_block: int, num_hashes: int, max_payload_bytes: int,
                  misfit: type[Exception] = KVLayoutError) -> None:
    """The invariants of every payload, checked once for both sides: export() on the blocks it is given,
    fetch() on the handle it is given. `what` names the payload in the errors.

    dtype equal, shape = (L, 2, n, block_size, Hkv, D) of `layout` with n >= 1 and nbytes (bytes) =
    n * bytes_per_block, else KVLayoutError; (n - 1) * block_size < num_tokens <= n * block_size, at most
    n block hashes and first_block >= 0, else `misfit` (export() passes ValueError: its caller's arguments
    are wrong); nbytes above max_payload_bytes: KVTransferError.
    """
    if dtype != layout.dtype:
        raise KVLayoutError(f"{what}: dtype {dtype} != layout dtype {layout.dtype}")
    shape = tuple(shape)
    if len(shape) != 6 or shape[2] < 1 or shape != layout.blocks_shape(shape[2]):
        raise KVLayoutError(f"{what}: shape {shape} does not fit layout {layout}")
    n = shape[2]
    if nbytes != n * layout.bytes_per_block:
        raise KVLayoutError(f"{what}: nbytes {nbytes} != {n} blocks of {layout.bytes_per_block} bytes")
    if not (n - 1) * layout.block_size < num_tokens <= n * layout.block_size:
        raise misfit(f"{what}: {num_tokens} tokens do not fill {n} blocks of {layout.block_size}")
    if num_hashes > n or first_block < 0:
        raise misfit(f"{what}: {num_hashes} hashes for {n} blocks, first_block {first_block}")
    if nbytes > max_payload_bytes:
        raise KVTransferError(f"{what}: {nbytes} bytes exceed max_payload_bytes {max_payload_bytes}")


def check_handle(handle: KVHandle, expected: KVLayout, max_payload_bytes: int) -> None:
    """Raise KVLayoutError unless the handle describes blocks of exactly `expected`: its advertised layout
    equal, and check_payload's invariants (KVTransferError above max_payload_bytes)."""
    what = f"export {handle.export_id}"
    if handle.layout != expected.to_dict():
        raise KVLayoutError(f"{what}: layout {handle.layout} != expected {expected.to_dict()}")
    check_payload(what, expected, handle.dtype, handle.shape, handle.nbytes, num_tokens=handle.num_tokens,
                  first_block=handle.first_block, num_hashes=len(handle.block_hashes),
                  max_payload_bytes=max_payload_bytes)


def payload_to_tensor(handle: KVHandle, payload: np.ndarray) -> torch.Tensor:
    """Check size and CRC-32 of received bytes and view them as the handle's tensor.

    The handle must already have passed check_handle(). A writable payload is
    wrapped without a copy. A read-only one (Ray's zero-copy numpy from the
    object store) is wrapped without a copy through DLPack, which accepts
    read-only arrays without torch's "non-writable" warning; the tensor then
    aliases read-only shared memory: read it (index_copy_ into a cache), never
    write it. It keeps the buffer alive for as long as it lives.
    """
    size = payload.nbytes
    if payload.dtype != np.uint8 or payload.ndim != 1 or size != handle.nbytes:
        raise KVCorruptError(f"export {handle.export_id}: got {size} bytes, expected {handle.nbytes} (truncated?)")
    crc = zlib.crc32(payload)
    if crc != handle.checksum:
        raise KVCorruptError(f"export {handle.export_id}: CRC-32 {crc:#010x} != {handle.checksum:#010x}")
    if payload.flags.writeable:
        flat = torch.from_numpy(payload)
    else:
        flat = torch.from_dlpack(payload)
    return flat.view(DTYPES[handle.dtype]).view(tuple(handle.shape))


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

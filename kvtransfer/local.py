"""LocalConnector: KV transfer inside one process (colocated mode, tests).

Design: the exporting connector keeps the payload (a reference to the
exported tensor's bytes, no copy) in its own staging area. A process-global
registry maps export_id -> exporting connector, so any LocalConnector in the
process can fetch a handle, and the exporting instance is the one that serves
it (its lock, lease and counters apply). The registry is acceptable because
"local" is in-process by definition; it holds an entry exactly as long as the
export is staged.

fetch returns a copy (writable, independent of the exporter), and the export
is freed once served ("freed when fetched").

Fault "timeout": the exporter never marks the payload ready (as if the
producer stalled), and the importer gives up after its config.timeout_s with
KVTimeoutError; the export stays staged until released or its lease passes.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, replace

import numpy as np

from kvtransfer.connector import KVConnector, StagedExport
from kvtransfer.errors import KVNotFoundError, KVTimeoutError
from kvtransfer.handle import KVHandle

_registry_lock = threading.Lock()
_owners: dict[str, LocalConnector] = {}


@dataclass(frozen=True)
class _LocalPayload:
    data: np.ndarray
    ready: threading.Event  # set unless the "timeout" fault is injected


class LocalConnector(KVConnector):
    """In-process transport; handle.locator is the export_id."""

    transport = "local"

    def _stage(self, handle: KVHandle, payload: np.ndarray) -> tuple[KVHandle, _LocalPayload]:
        ready = threading.Event()
        if self.config.fault != "timeout":
            ready.set()
        with _registry_lock:
            _owners[handle.export_id] = self
        return replace(handle, locator=handle.export_id), _LocalPayload(payload, ready)

    def _on_free(self, entry: StagedExport) -> None:
        with _registry_lock:
            if _owners.get(entry.handle.export_id) is self:
                del _owners[entry.handle.export_id]

    def _fetch_payload(self, handle: KVHandle) -> np.ndarray:
        with _registry_lock:
            owner = _owners.get(handle.locator)
        if owner is None:
            raise KVNotFoundError(f"export {handle.export_id}: unknown, released or expired")
        return owner._serve(handle.locator, self.config.timeout_s)

    def _serve(self, export_id: str, timeout_s: float) -> np.ndarray:
        entry = self._lookup(export_id)
        if entry is None:
            raise KVNotFoundError(f"export {export_id}: unknown, released or expired")
        payload: _LocalPayload = entry.stored
        if not payload.ready.wait(timeout_s):
            raise KVTimeoutError(f"export {export_id}: not ready within {timeout_s} s")
        data = payload.data.copy()
        self._free(export_id)
        return data

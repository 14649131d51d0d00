"""How KV blocks travel between engines: transport choice, leases, limits."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Transport = Literal["local", "ray", "grpc"]
Fault = Literal["corrupt", "truncate", "timeout", "wrong_layout"]


@dataclass(frozen=True)
class KVTransferConfig:
    """Units: seconds and bytes.

    lease_s: an export not fetched (or released) within this long is freed.
    fault: for tests and drills only; the exporting side injects this fault
    into what it serves, so the importer's checks are exercised for real.
    """

    transport: Transport = "ray"
    lease_s: float = 30.0
    timeout_s: float = 10.0
    chunk_bytes: int = 1 << 20
    max_payload_bytes: int = 4 << 30
    grpc_host: str = "127.0.0.1"
    grpc_port: int = 0  # 0: pick a free port
    fault: Fault | None = None

    @classmethod
    def coerce(cls, value: KVTransferConfig | dict | None) -> KVTransferConfig:
        """A KVTransferConfig from itself, a dict of its fields or None (defaults)."""
        return value if isinstance(value, cls) else cls(**(value or {}))

    def __post_init__(self) -> None:
        if self.transport not in ("local", "ray", "grpc"):
            raise ValueError(f"transport must be local, ray or grpc, got {self.transport!r}")
        if self.lease_s <= 0 or self.timeout_s <= 0:
            raise ValueError("lease_s and timeout_s must be > 0")
        if not 1 << 10 <= self.chunk_bytes <= 64 << 20:
            raise ValueError(f"chunk_bytes must be in [1 KiB, 64 MiB], got {self.chunk_bytes}")

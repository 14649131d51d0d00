"""KVHandle: what a prefill worker hands over so a decode worker can fetch a request's KV."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class KVHandle:
    """Describes one export: blocks [first_block, first_block + shape[2]) of a request's block table.

    shape = [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim];
    num_tokens: tokens of K/V the payload holds (the last block may be partial);
    block_hashes: hashes of the full blocks among them, in order;
    checksum: CRC-32 of the payload bytes; lease_expires_at: wall-clock seconds.
    locator: transport-specific address of the export (an id, or host:port/id).
    object_ref: the Ray ObjectRef for the "ray" transport (None otherwise).
    fetch_token: the export's own secret for the "grpc" transport (None otherwise): the exporter serves
    the bytes only to a fetch that presents it, so knowing a locator (from a log, say) is not enough.
    The handle travels from exporter to importer inside Ray's authenticated calls only.
    """

    request_id: str
    export_id: str
    transport: str
    locator: str
    layout: dict
    dtype: str
    shape: tuple[int, ...]
    first_block: int
    num_tokens: int
    block_hashes: tuple[bytes, ...]
    checksum: int
    nbytes: int
    lease_expires_at: float
    object_ref: Any = field(default=None, compare=False)
    fetch_token: str | None = field(default=None, compare=False, repr=False)

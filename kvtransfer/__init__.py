"""How KV blocks travel between engines: one KVConnector interface, three transports.

    connector = make_connector(KVTransferConfig(transport="grpc"))
    handle = connector.export(request_id, blocks, layout, first_block=0, num_tokens=n, block_hashes=hashes)
    blocks = other_connector.fetch(handle, expected_layout)   # importing side
    connector.release(handle.export_id)                       # or let the lease expire

Transports are imported on demand, so `import kvtransfer` pulls in neither Ray nor gRPC.
"""

from __future__ import annotations

from kvtransfer.config import KVTransferConfig
from kvtransfer.connector import KVConnector, TransferStats
from kvtransfer.errors import (
    KVAuthError,
    KVCorruptError,
    KVLayoutError,
    KVNotFoundError,
    KVTimeoutError,
    KVTransferError,
)
from kvtransfer.handle import KVHandle

__all__ = [
    "KVAuthError", "KVConnector", "KVCorruptError", "KVHandle", "KVLayoutError", "KVNotFoundError", "KVTimeoutError",
    "KVTransferConfig", "KVTransferError", "TransferStats", "make_connector",
]


def make_connector(config: KVTransferConfig) -> KVConnector:
    """The connector for config.transport ("ray" needs ray.init() done first)."""
    if config.transport == "local":
        from kvtransfer.local import LocalConnector
        return LocalConnector(config)
    if config.transport == "ray":
        from kvtransfer.ray_transport import RayConnector
        return RayConnector(config)
    if config.transport == "grpc":
        from kvtransfer.grpc_transport import GrpcConnector
        return GrpcConnector(config)
    raise ValueError(f"unknown transport {config.transport!r}")

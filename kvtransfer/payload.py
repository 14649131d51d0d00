"""A KV payload and the checks on it, the same for every transport and for both sides.

Payloads are raw bytes: the C-contiguous bytes of the blocks tensor
[num_layers, 2, n, block_size, num_kv_heads, head_dim] in layout.dtype. Units: bytes.

One check of a payload's invariants (check_payload: layout, dtype, shape, sizes) runs on the blocks
given to export() and, through check_handle, on the handle given to fetch(); payload_to_tensor checks
the bytes received (size, CRC-32) before it views them as the handle's tensor.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import numpy as np
import torch

from engine.kv_cache import DTYPES, KVLayout
from kvtransfer.errors import KVCorruptError, KVLayoutError, KVTransferError
from kvtransfer.handle import KVHandle


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

"""Block hashes: the keys of the prefix cache, on every worker and cluster-wide.

hash(block i) = SHA-256(hash(block i-1) || token ids of block i || extra keys),
with extra keys = model id and cache salt. Because each hash covers its
parent, equal hashes mean equal whole prefixes, not just equal blocks; because
the salt is inside, two tenants with different salts never share a block.
SHA-256 (not Python's hash()) so every process on every node agrees.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence

BlockHash = bytes  # 32 bytes

ROOT_HASH: BlockHash = b"\x00" * 32


def extra_keys(model_id: str, cache_salt: str | None) -> bytes:
    """The bytes mixed into every block hash of a request."""
    return f"{model_id}\x00{cache_salt or ''}".encode()


def hash_block(parent: BlockHash, token_ids: Sequence[int], extra: bytes) -> BlockHash:
    """Hash of one full block given its parent's hash (ROOT_HASH for the first block)."""
    h = hashlib.sha256(parent)
    h.update(array("q", token_ids).tobytes())
    h.update(extra)
    return h.digest()


def hash_full_blocks(token_ids: Sequence[int], block_size: int, extra: bytes,
                     known: list[BlockHash] | None = None) -> list[BlockHash]:
    """Hashes of every full block of token_ids, extending `known` (hashes already computed)."""
    hashes = list(known or [])
    parent = hashes[-1] if hashes else ROOT_HASH
    for start in range(len(hashes) * block_size, len(token_ids) - block_size + 1, block_size):
        parent = hash_block(parent, token_ids[start:start + block_size], extra)
        hashes.append(parent)
    return hashes

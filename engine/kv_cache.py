"""The paged K/V tensors of one engine and whole-block export/import.

One tensor holds every layer: [num_layers, 2 (K, V), num_blocks, block_size,
num_kv_heads, head_dim]. It is allocated once from the byte budget; nothing
allocates KV per request. Exported blocks keep that layout, so a block moved
to another engine with the same KVLayout is bit-identical there.

The tensor lives on the engine's device. Blocks leave it (read_blocks) and
enter it (write_blocks) as host tensors, in one indexed copy each way; on CUDA
the host side is pinned memory, so the copy runs at DMA rate.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from engine.device import host_device

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class KVLayout:
    """Shape of one block's K/V across all layers. Two engines can exchange blocks iff layouts are equal."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: str

    @property
    def bytes_per_block(self) -> int:
        """Bytes of K and V of one block over all layers."""
        elem = torch.empty((), dtype=DTYPES[self.dtype]).element_size()
        return 2 * self.num_layers * self.block_size * self.num_kv_heads * self.head_dim * elem

    def blocks_shape(self, n: int) -> tuple[int, ...]:
        """Shape of n blocks as read, exported and imported: (num_layers, 2, n, block_size, Hkv, D)."""
        return (self.num_layers, 2, n, self.block_size, self.num_kv_heads, self.head_dim)

    def to_dict(self) -> dict:
        return asdict(self)


class PagedKVCache:
    def __init__(self, layout: KVLayout, num_blocks: int, device: torch.device | str = "cpu") -> None:
        self.layout = layout
        self.num_blocks = num_blocks
        self.device = torch.device(device)
        self.host = host_device(self.device)
        self.data = torch.zeros(layout.num_layers, 2, num_blocks, layout.block_size, layout.num_kv_heads,
                                layout.head_dim, dtype=DTYPES[layout.dtype], device=self.device)

    @classmethod
    def from_budget(cls, layout: KVLayout, budget_bytes: int, device: torch.device | str = "cpu") -> PagedKVCache:
        return cls(layout, blocks_in(layout, budget_bytes), device)

    def layer_caches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (k_cache, v_cache) views, each [num_blocks, block_size, num_kv_heads, head_dim]."""
        return [(self.data[i, 0], self.data[i, 1]) for i in range(self.layout.num_layers)]

    def read_blocks(self, block_ids: list[int]) -> torch.Tensor:
        """A host copy of the given blocks: [num_layers, 2, len(block_ids), block_size, Hkv, D], contiguous."""
        gathered = self.data.index_select(2, self._index(block_ids))
        if gathered.device == self.host:
            return gathered
        out = torch.empty(gathered.shape, dtype=gathered.dtype, device=self.host, pin_memory=True)
        out.copy_(gathered)  # synchronous: the caller may hand the bytes to another process at once
        return out

    def write_blocks(self, block_ids: list[int], blocks: torch.Tensor) -> None:
        """Overwrite the given blocks with data shaped like read_blocks' result (on the host or the device)."""
        expected = self.layout.blocks_shape(len(block_ids))
        if tuple(blocks.shape) != expected or blocks.dtype != self.data.dtype:
            raise ValueError(f"blocks of shape {tuple(blocks.shape)} {blocks.dtype} do not fit "
                             f"layout {expected} {self.data.dtype}")
        self.data.index_copy_(2, self._index(block_ids), blocks.to(self.device))

    def copy_blocks(self, src: list[int], dst: list[int]) -> None:
        """Copy whole blocks inside the cache, on the device (every layer, K and V); src and dst may overlap."""
        self.data.index_copy_(2, self._index(dst), self.data.index_select(2, self._index(src)))

    def _index(self, block_ids: list[int]) -> torch.Tensor:
        return torch.tensor(block_ids, dtype=torch.long, device=self.device)


def blocks_in(layout: KVLayout, budget_bytes: int) -> int:
    """Whole blocks of `layout` in budget_bytes; ValueError when not even one fits."""
    num_blocks = budget_bytes // layout.bytes_per_block
    if num_blocks < 1:
        raise ValueError(f"kv_cache_bytes={budget_bytes} holds no block of {layout.bytes_per_block} bytes")
    return num_blocks

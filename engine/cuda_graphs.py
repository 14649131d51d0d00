"""Decode forwards captured as CUDA graphs, one per batch-size bucket.

A decode step of a small model on a GPU is mostly launch overhead: hundreds
of small kernels, each a few microseconds of CPU time. A CUDA graph replays
the whole forward as one launch. Graphs need fixed shapes and fixed memory,
so each bucket size B has static input buffers (token ids, positions, slot
mapping, block tables sized for max_model_len, context lengths) that a
replay reads. A batch of b <= B decodes is copied into rows [0, b); rows
[b, B) are padding: token 0 at position 0, slot -1 (its K/V is never
written), context length 1 reading block 0 (its output is thrown away).

Invariants:
- Only decode-only batches replay (one new token per sequence, every row
  sampled); anything else runs eagerly.
- Everything a replay reads is in the static buffers; the captured forward
  never syncs with the host (the Triton kernels pick their grids from shapes).
- Buckets are captured largest first into one shared memory pool, as vLLM and
  nano-vllm do, so all buckets together cost about one largest-bucket's memory.

`capture` is how a forward becomes replayable: `cuda_capture` on CUDA; tests
on the CPU pass `eager_capture`, which replays by running the forward again
on the same static buffers, so padding and buffer handling are checked
without a GPU.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from engine.attention import ForwardContext

# A captured forward: call it to replay; it refills the returned logits tensor in place.
Replay = Callable[[], None]
Capture = Callable[[Callable[[], torch.Tensor]], tuple[Replay, torch.Tensor]]


def bucket_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then every 8 up to max_num_seqs (always included): padding stays under 8 rows past 8."""
    sizes = [s for s in (1, 2, 4) if s < max_num_seqs] + list(range(8, max_num_seqs, 8))
    return sorted(set(sizes) | {max_num_seqs})


def eager_capture(forward: Callable[[], torch.Tensor]) -> tuple[Replay, torch.Tensor]:
    """A stand-in for CUDA capture: replay runs forward again and copies into one output tensor."""
    out = forward().clone()
    return (lambda: out.copy_(forward())), out


def cuda_capture(pool: object) -> Capture:
    """Capture into CUDA graphs sharing the memory pool `pool` (torch.cuda.graph_pool_handle())."""
    def capture(forward: Callable[[], torch.Tensor]) -> tuple[Replay, torch.Tensor]:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            forward()  # warm-up outside the graph: Triton compiles, allocators settle
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            out = forward()
        return graph.replay, out

    return capture


@dataclass
class _Bucket:
    size: int
    input_ids: torch.Tensor  # [1, B]
    positions: torch.Tensor  # [1, B]
    slot_mapping: torch.Tensor  # [B]
    block_tables: torch.Tensor  # [B, max_blocks]
    seq_lens: torch.Tensor  # [B]
    replay: Replay | None = None
    logits: torch.Tensor | None = None  # [B, vocab] float32, refilled by each replay


class DecodeGraphs:
    """Replayable decode forwards for batches of up to max(bucket_sizes) sequences."""

    def __init__(self, forward: Callable[[torch.Tensor, torch.Tensor, ForwardContext, torch.Tensor], torch.Tensor],
                 kv_caches: list[tuple[torch.Tensor, torch.Tensor]], sizes: list[int], max_blocks: int,
                 backend: str, device: torch.device, capture: Capture) -> None:
        """forward(input_ids, positions, ctx, logits_indices) -> logits [B, vocab] float32 (the model runner's)."""
        self.sizes = sorted(sizes)
        self._buckets: dict[int, _Bucket] = {}
        for size in reversed(self.sizes):  # largest first: later captures reuse its pool memory
            bucket = _Bucket(size=size,
                             input_ids=torch.zeros(1, size, dtype=torch.long, device=device),
                             positions=torch.zeros(1, size, dtype=torch.long, device=device),
                             slot_mapping=torch.full((size,), -1, dtype=torch.long, device=device),
                             block_tables=torch.zeros(size, max_blocks, dtype=torch.long, device=device),
                             seq_lens=torch.ones(size, dtype=torch.long, device=device))
            ctx = ForwardContext(kv_caches=kv_caches, slot_mapping=bucket.slot_mapping, query_lens=[1] * size,
                                 seq_lens=[1] * size, block_tables=bucket.block_tables, num_decodes=size,
                                 decode_seq_lens=bucket.seq_lens, backend=backend)
            rows = torch.arange(size, device=device)

            def run(b: _Bucket = bucket, c: ForwardContext = ctx, r: torch.Tensor = rows) -> torch.Tensor:
                return forward(b.input_ids, b.positions, c, r)

            bucket.replay, bucket.logits = capture(run)
            self._buckets[size] = bucket

    @property
    def max_batch(self) -> int:
        return self.sizes[-1]

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, slot_mapping: torch.Tensor,
            block_tables: torch.Tensor, seq_lens: torch.Tensor) -> torch.Tensor:
        """Logits [b, vocab] of a decode-only batch of b <= max_batch rows (the eager forward's inputs)."""
        b = slot_mapping.shape[0]
        bucket = self._buckets[next(s for s in self.sizes if s >= b)]
        bucket.input_ids[:, :b].copy_(input_ids)
        bucket.positions[:, :b].copy_(positions)
        bucket.slot_mapping[:b].copy_(slot_mapping)
        bucket.block_tables[:b].zero_()
        bucket.block_tables[:b, :block_tables.shape[1]].copy_(block_tables)
        bucket.seq_lens[:b].copy_(seq_lens)
        # Rows past b are padding again: a larger earlier batch left real slots there, and a replay
        # writing K/V through them would overwrite blocks other requests own.
        bucket.slot_mapping[b:].fill_(-1)
        bucket.seq_lens[b:].fill_(1)
        bucket.replay()
        return bucket.logits[:b]

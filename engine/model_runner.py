"""Turns a scheduled step into one packed forward pass and returns the logits to sample.

Every tensor of a step is built on the host and moved to the KV cache's
device (the model's) in one copy; nothing else crosses.

Packing: every scheduled token of every sequence in one row (batch dim 1),
decodes first, then prefill chunks. positions restart per sequence (RoPE
needs them); logits are computed only for the last token of sequences whose
prompt is complete after this step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from engine.attention import ForwardContext, plan_decode_buckets
from engine.cuda_graphs import Capture, DecodeGraphs, bucket_sizes
from engine.kv_cache import PagedKVCache
from engine.request import Request


@dataclass
class StepBatch:
    """One step's packed inputs. sample_requests[i] owns logits row i."""

    input_ids: torch.Tensor  # [1, T]
    positions: torch.Tensor  # [1, T]
    ctx: ForwardContext
    logits_indices: torch.Tensor  # [S] rows of the packed batch whose logits are needed
    sample_requests: list[Request]


class ModelRunner:
    def __init__(self, model: PreTrainedModel, kv_cache: PagedKVCache, backend: str) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.block_size = kv_cache.layout.block_size
        self.backend = backend
        self.device = kv_cache.device
        self._layer_caches = kv_cache.layer_caches()
        self._workspace: dict = {}  # gather buffers reused across steps
        self.graphs: DecodeGraphs | None = None  # set by capture_decode_graphs

    def prepare(self, scheduled: list[tuple[Request, int]]) -> StepBatch:
        """scheduled: (request, new tokens this step), decodes (1 token) first.

        Decodes are packed sorted by context length so that attention can
        split them into contiguous length buckets.
        """
        bs = self.block_size
        num_decodes = 0
        while num_decodes < len(scheduled) and scheduled[num_decodes][1] == 1:
            num_decodes += 1
        decodes = sorted(scheduled[:num_decodes], key=lambda item: item[0].num_computed_tokens)
        scheduled = decodes + list(scheduled[num_decodes:])
        tokens: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_lens: list[int] = []
        seq_lens: list[int] = []
        tables: list[list[int]] = []
        logits_indices: list[int] = []
        sample_requests: list[Request] = []
        for req, n in scheduled:
            start, end = req.num_computed_tokens, req.num_computed_tokens + n
            ids = [b.block_id for b in req.block_table]
            tokens.extend(req.all_token_ids[start:end])
            positions.extend(range(start, end))
            slots.extend(ids[p // bs] * bs + p % bs for p in range(start, end))
            query_lens.append(n)
            seq_lens.append(end)
            tables.append(ids)
            if end == req.num_tokens:  # the prompt (or last token) is complete: sample next
                logits_indices.append(len(tokens) - 1)
                sample_requests.append(req)
        width = max(len(t) for t in tables)
        block_tables = torch.zeros(len(tables), width, dtype=torch.long)
        for i, t in enumerate(tables):
            block_tables[i, : len(t)] = torch.tensor(t, dtype=torch.long)
        input_ids, pos, slot_mapping, decode_seq_lens, logits_rows, block_tables = self._to_device(
            torch.tensor([tokens], dtype=torch.long), torch.tensor([positions], dtype=torch.long),
            torch.tensor(slots, dtype=torch.long), torch.tensor(seq_lens[:num_decodes], dtype=torch.long),
            torch.tensor(logits_indices, dtype=torch.long), block_tables)
        ctx = ForwardContext(
            kv_caches=self._layer_caches,
            slot_mapping=slot_mapping,
            query_lens=query_lens,
            seq_lens=seq_lens,
            block_tables=block_tables,
            num_decodes=num_decodes,
            decode_seq_lens=decode_seq_lens,
            decode_buckets=plan_decode_buckets(seq_lens[:num_decodes], bs) if self.backend == "torch" else None,
            backend=self.backend,
            workspace=self._workspace,
        )
        return StepBatch(input_ids=input_ids, positions=pos, ctx=ctx, logits_indices=logits_rows,
                         sample_requests=sample_requests)

    def _to_device(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The step's int64 host tensors on the model's device, in one host-to-device copy (pinned on CUDA)."""
        if self.device.type == "cpu":
            return tensors
        flat = torch.cat([t.reshape(-1) for t in tensors])
        if self.device.type == "cuda":
            flat = flat.pin_memory()
        flat = flat.to(self.device, non_blocking=True)
        out, start = [], 0
        for t in tensors:
            out.append(flat[start:start + t.numel()].view(t.shape))
            start += t.numel()
        return tuple(out)

    def capture_decode_graphs(self, max_num_seqs: int, max_model_len: int, capture: Capture) -> None:
        """From now on, decode-only batches of up to max_num_seqs replay captured forwards (engine/cuda_graphs.py)."""
        with torch.inference_mode():
            self.graphs = DecodeGraphs(self._forward, self._layer_caches, bucket_sizes(max_num_seqs),
                                       -(-max_model_len // self.block_size), self.backend, self.device, capture)

    @torch.inference_mode()
    def forward(self, batch: StepBatch) -> torch.Tensor:
        """Logits [S, vocab] in float32 for batch.sample_requests (S may be 0)."""
        ctx = batch.ctx
        num = len(batch.sample_requests)
        if self.graphs is not None and 0 < num == ctx.num_decodes == len(ctx.query_lens) <= self.graphs.max_batch:
            return self.graphs.run(batch.input_ids, batch.positions, ctx.slot_mapping, ctx.block_tables,
                                   ctx.decode_seq_lens)
        keep = batch.logits_indices if num else torch.zeros(1, dtype=torch.long, device=self.device)
        logits = self._forward(batch.input_ids, batch.positions, ctx, keep)
        return logits if num else logits[:0]

    def _forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext,
                 logits_indices: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=input_ids, position_ids=positions, logits_to_keep=logits_indices,
                         use_cache=False, pdserve_ctx=ctx)
        return out.logits[0].float()

"""Size the KV pool from what the GPU has left, as vLLM's gpu_memory_utilization does.

The engine may fill `gpu_memory_utilization` of the GPU's total memory. What
is in use before the pool exists (the weights, the CUDA context, anything
else on the GPU) and the peak of one worst-case step's activations come off
that; the rest, in whole blocks, is the KV pool. The worst-case step is a
prefill of max_num_batched_tokens tokens (the most one step computes) plus
the sampler's work on max_num_seqs rows of float32 logits.

Units: bytes throughout.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from engine.block_pool import KVBlock
from engine.config import EngineConfig, SamplingParams
from engine.kv_cache import KVLayout, PagedKVCache
from engine.model_runner import ModelRunner
from engine.request import Request


def kv_budget_bytes(utilization: float, total: int, in_use: int, step_peak: int) -> int:
    """utilization * total - in_use - step_peak: the bytes the KV pool may take.

    Raises ValueError when nothing is left, naming what took the memory.
    """
    budget = int(utilization * total) - in_use - step_peak
    if budget <= 0:
        raise ValueError(f"gpu_memory_utilization={utilization} allows {int(utilization * total)} bytes, but "
                         f"{in_use} are in use before the KV pool (weights, CUDA context, other processes) and a "
                         f"peak step takes {step_peak}: no room for KV; raise it or lower max_num_batched_tokens")
    return budget


@torch.inference_mode()
def profile_step(model: PreTrainedModel, layout: KVLayout, backend: str, device: torch.device,
                 config: EngineConfig) -> None:
    """Run one worst-case step on `device`: a prefill of max_num_batched_tokens tokens (capped by the
    model's positions) into a pool just big enough for it, then a sort and softmax over max_num_seqs rows
    of logits as the sampler does. Allocates nothing that outlives the call."""
    text = model.config.get_text_config()
    num_tokens = min(config.max_num_batched_tokens, getattr(text, "max_position_embeddings", None) or 1 << 30)
    num_blocks = -(-num_tokens // layout.block_size)
    runner = ModelRunner(model, PagedKVCache(layout, num_blocks, device), backend)
    req = Request(request_id="profile", prompt_token_ids=[0] * num_tokens, sampling_params=SamplingParams(),
                  hash_extra=b"", max_total_tokens=num_tokens + 1)
    req.block_table = [KVBlock(i) for i in range(num_blocks)]
    runner.forward(runner.prepare([(req, num_tokens)]))
    logits = torch.zeros(config.max_num_seqs, text.vocab_size, dtype=torch.float32, device=device)
    logits.sort(dim=-1, descending=True)[0].softmax(dim=-1)


def kv_budget_from_gpu(model: PreTrainedModel, layout: KVLayout, backend: str, device: torch.device,
                       config: EngineConfig) -> int:
    """The KV pool's bytes on CUDA `device`: profile one worst-case step, then kv_budget_bytes."""
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    free, total = torch.cuda.mem_get_info(device)
    allocated = torch.cuda.memory_allocated(device)
    profile_step(model, layout, backend, device, config)
    torch.cuda.synchronize(device)
    step_peak = torch.cuda.max_memory_allocated(device) - allocated
    torch.cuda.empty_cache()
    return kv_budget_bytes(config.gpu_memory_utilization, total, total - free, step_peak)

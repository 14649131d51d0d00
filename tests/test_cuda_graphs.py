"""Decode graphs (engine/cuda_graphs.py) without a GPU.

CUDA capture itself needs a GPU; what can go wrong around it can be checked
here with `eager_capture`, which replays by re-running the forward on the
same static buffers: bucket choice, copying a batch into a larger bucket,
padding rows that must neither write K/V nor disturb real rows, and stale rows
left by a larger earlier batch. Outputs must equal the eager engine's, token
for token, as batch sizes shrink while requests finish.
"""

from __future__ import annotations

import pytest
import torch

from engine import LLM, SamplingParams
from engine.cuda_graphs import bucket_sizes, eager_capture
from tests.engine_helpers import random_prompts


def test_bucket_sizes_cover_every_batch_with_little_padding() -> None:
    assert bucket_sizes(1) == [1]
    assert bucket_sizes(6) == [1, 2, 4, 6]
    sizes = bucket_sizes(64)
    assert sizes[:4] == [1, 2, 4, 8] and sizes[-1] == 64
    for b in range(1, 65):
        bucket = next(s for s in sizes if s >= b)
        assert bucket - b < max(8, b)  # never more padding than rows, and under 8 past 8


def _llm(backend: str, graphs: bool) -> LLM:
    llm = LLM("tiny", attention_backend=backend, num_kv_blocks=64, max_num_seqs=6, enable_prefix_caching=False)
    if graphs:
        llm.engine.runner.capture_decode_graphs(6, llm.engine.max_model_len, eager_capture)
    return llm


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_replayed_decodes_equal_eager_ones(backend: str) -> None:
    prompts = random_prompts([3, 17, 9, 20, 5], 8192, seed=3)
    params = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True) for m in (2, 9, 4, 12, 6)]
    want = [o.outputs[0].token_ids for o in _llm(backend, graphs=False).generate(prompts, params)]
    llm = _llm(backend, graphs=True)
    replays = 0
    original = llm.engine.runner.graphs.run

    def counting(*args: torch.Tensor) -> torch.Tensor:
        nonlocal replays
        replays += 1
        return original(*args)

    llm.engine.runner.graphs.run = counting
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    assert got == want
    assert replays >= 10  # the decode steps (5 rows shrinking to 1) went through the graphs
    assert llm.stats().num_blocks_free == 64


def _changed_slots(after: torch.Tensor, before: torch.Tensor) -> list[list[int]]:
    """[block, offset] of every cache slot whose K or V differs in any layer or head."""
    return (after != before).any(dim=5).any(dim=4).any(dim=1).any(dim=0).nonzero().tolist()


def test_padding_rows_write_no_kv() -> None:
    """A batch of 1 after a batch of 3 in the same bucket: only row 0's slot changes in the cache."""
    llm = _llm("torch", graphs=True)
    engine = llm.engine
    for i, prompt in enumerate(random_prompts([5, 9, 7], 8192, seed=4)):
        engine.add_request(prompt, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True),
                           request_id=str(i))
    while any(r.num_output_tokens < 2 for r in engine.requests.values()):
        engine.step()  # 3-row decodes replay the 4-row bucket
    engine.abort_request("1")
    engine.abort_request("2")
    req = engine.requests["0"]
    slot = req.block_table[req.num_computed_tokens // 16].block_id * 16 + req.num_computed_tokens % 16
    before = engine.kv_cache.data.clone()
    engine.step()  # 1 row: bucket 1
    # the same row once more through the 4-row bucket, whose rows 1-3 hold the 3-row batch's real slots
    assert _changed_slots(engine.kv_cache.data, before) == [[slot // 16, slot % 16]]
    graphs = engine.runner.graphs
    batch = engine.runner.prepare([(req, 1)])
    before = engine.kv_cache.data.clone()
    bucket = graphs._buckets[4]
    graphs.sizes = [4]  # route the one-row batch through the stale 4-row bucket
    with torch.inference_mode():  # as the runner calls it
        graphs.run(batch.input_ids, batch.positions, batch.ctx.slot_mapping, batch.ctx.block_tables,
                   batch.ctx.decode_seq_lens)
    assert bucket.slot_mapping[1:].tolist() == [-1, -1, -1]
    new = req.block_table[req.num_computed_tokens // 16].block_id * 16 + req.num_computed_tokens % 16
    assert _changed_slots(engine.kv_cache.data, before) == [[new // 16, new % 16]]  # the real row's alone

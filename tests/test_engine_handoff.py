"""The engine's hand-over hooks, without Ray: hold a prefilled request's KV, import it elsewhere.

This is the contract the prefill and decode workers are built on: a prompt
prefilled by one engine and decoded by another gives the same tokens as one
engine doing both; bad payloads are refused without changing state.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from engine import Engine, EngineConfig, SamplingParams
from tests.engine_helpers import random_prompts

GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)


@pytest.fixture(scope="module")
def engines() -> tuple[Engine, Engine]:
    return Engine(EngineConfig()), Engine(EngineConfig())


def _run(engine: Engine) -> None:
    while engine.has_unfinished_requests():
        engine.step()


def _prefill(engine: Engine, rid: str, prompt: list[int], skip_blocks: int) -> tuple[int, torch.Tensor]:
    req = engine.add_request(prompt, SamplingParams(temperature=0.0, max_tokens=1), rid, hold_kv=True)
    _run(engine)
    assert rid in engine.held and engine.stats().num_blocks_free < engine.stats().num_blocks_total
    blocks = engine.read_held_blocks(rid, skip_blocks)
    assert engine.release_held(rid) and not engine.release_held(rid)
    return req.output_token_ids[0], blocks


def _one_engine_tokens(prompt: list[int], params: SamplingParams) -> list[int]:
    """The reference for every hand-off: what one engine doing both prefill and decode outputs."""
    one = Engine(EngineConfig())
    ref = one.add_request(prompt, params, "ref")
    _run(one)
    return ref.output_token_ids


def _assert_free(*engines: Engine) -> None:
    for e in engines:
        s = e.stats()
        assert s.num_blocks_free == s.num_blocks_total and not e.requests and not e.held


def test_prefill_here_decode_there_equals_one_engine(engines) -> None:
    prefill, decode = engines
    system = random_prompts([220], 8192, seed=61)[0]
    reference = Engine(EngineConfig())
    for i, prompt in enumerate(random_prompts([1, 40, 300], 8192, seed=62, prefix=system) + [[9]]):
        rid = f"handoff-{i}"
        ref_req = reference.add_request(prompt, GREEDY, rid)
        _run(reference)
        req = decode.add_request(prompt, GREEDY, rid, defer=True)
        skip = req.num_computed_tokens // 16  # blocks this engine already holds: not sent again
        assert skip == (13 if i in (1, 2) else 0)
        first, blocks = _prefill(prefill, rid, prompt, skip)
        assert decode.accept_first_token(rid, first)
        decode.attach_kv(rid, blocks, len(prompt) - skip * 16)
        decode.enqueue(rid)
        _run(decode)
        assert req.output_token_ids == ref_req.output_token_ids
    assert decode.stats().prompt_tokens_computed == 0
    _assert_free(prefill, decode)


SEEDED = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=12, ignore_eos=True)


@pytest.mark.parametrize("with_kv", [True, False], ids=["kv", "kv-lost"])
@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_first_token_and_sampler_state_carry_over(engines, params: SamplingParams, with_kv: bool) -> None:
    """The prefill engine's first token and random state continue on the decode engine, whether the KV
    follows or not (a transfer that failed after the first token went out: the prompt is computed here)."""
    prefill, decode = engines
    system = random_prompts([220], 8192, seed=61)[0]
    prompt = random_prompts([45], 8192, seed=66, prefix=system)[0]
    expected = _one_engine_tokens(prompt, params)
    req = decode.add_request(prompt, params, "carry", defer=True)
    skip = req.num_computed_tokens // 16
    pre = prefill.add_request(prompt, replace(params, max_tokens=1), "carry", hold_kv=True)
    _run(prefill)
    blocks, state = prefill.read_held_blocks("carry", skip), prefill.sampler_state("carry")
    prefill.release_held("carry")
    assert decode.accept_first_token("carry", pre.output_token_ids[0], sampler_state=state)
    with pytest.raises(ValueError, match="already has"):
        decode.accept_first_token("carry", pre.output_token_ids[0])
    if with_kv:
        decode.attach_kv("carry", blocks, len(prompt) - skip * 16)
    decode.enqueue("carry")
    _run(decode)
    assert req.output_token_ids == expected
    _assert_free(prefill, decode)


def test_bad_payload_is_refused_without_state_change(engines) -> None:
    _, decode = engines
    prompt = random_prompts([50], 8192, seed=63)[0]
    req = decode.add_request(prompt, GREEDY, "bad", defer=True)
    good_shape = decode.layout.blocks_shape(4)
    with pytest.raises(ValueError, match="does not fit"):
        decode.attach_kv("bad", torch.zeros(decode.layout.blocks_shape(3)), 50)
    with pytest.raises(ValueError, match="does not fit"):
        decode.attach_kv("bad", torch.zeros(good_shape, dtype=torch.float64), 50)
    with pytest.raises(ValueError, match="outside"):
        decode.attach_kv("bad", torch.zeros(good_shape), 51)
    with pytest.raises(ValueError, match="vocabulary"):
        decode.accept_first_token("bad", 10**6)
    assert req.pending_kv is None and req.num_output_tokens == 0
    decode.enqueue("bad")  # fallback: compute the prompt here
    with pytest.raises(ValueError, match="not a deferred request"):
        decode.accept_first_token("bad", 5)  # queued: too late for a token from elsewhere
    _run(decode)
    assert req.num_output_tokens == GREEDY.max_tokens
    _assert_free(decode)


def test_first_token_that_ends_the_request_needs_no_kv(engines) -> None:
    prefill, decode = engines
    prompt = random_prompts([20], 8192, seed=64)[0]
    params = SamplingParams(temperature=0.0, max_tokens=1)
    decode.pop_finished()
    req = decode.add_request(prompt, params, "one", defer=True)
    first, _ = _prefill(prefill, "one", prompt, 0)
    assert not decode.accept_first_token("one", first)
    assert req.is_finished and req.output_token_ids == [first]
    assert [r.request_id for r in decode.pop_finished()] == ["one"]
    decode.enqueue("one")  # nothing left to do
    _assert_free(prefill, decode)


def test_abort_of_deferred_and_held_requests_frees_blocks(engines) -> None:
    prefill, decode = engines
    system = random_prompts([220], 8192, seed=61)[0]
    decode.add_request(system + [5, 6], GREEDY, "deferred", defer=True)
    assert decode.stats().num_requests_deferred == 1
    decode.abort_request("deferred")
    prefill.add_request(system, SamplingParams(temperature=0.0, max_tokens=1), "held", hold_kv=True)
    _run(prefill)
    assert prefill.stats().num_requests_held == 1
    prefill.abort_request("held")
    _assert_free(prefill, decode)


# ---- the coarse hand-offs the workers make: finish_prefill on one side, import_kv on the other -------------

def _held_prefill(engine: Engine, rid: str, prompt: list[int], params: SamplingParams) -> None:
    """A prefill worker's request up to its first token: deferred, queued without KV, run, then held."""
    engine.add_request(prompt, replace(params, max_tokens=1), rid, hold_kv=True, defer=True)
    engine.import_kv(rid)
    _run(engine)


@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_finish_prefill_and_import_kv_equal_one_engine(engines, params: SamplingParams) -> None:
    """One call hands the prefill over (its blocks freed inside), one call imports it: the tokens equal a
    one-engine run's, and neither engine keeps a block."""
    prefill, decode = engines
    system = random_prompts([220], 8192, seed=61)[0]
    prompt = random_prompts([37], 8192, seed=67, prefix=system)[0]
    expected = _one_engine_tokens(prompt, params)
    computed_before = decode.stats().prompt_tokens_computed
    req = decode.add_request(prompt, params, "coarse", defer=True)
    skip = req.num_computed_tokens // 16
    _held_prefill(prefill, "coarse", prompt, params)
    export = prefill.finish_prefill("coarse", skip)
    assert not prefill.held and prefill.stats().num_blocks_free == prefill.stats().num_blocks_total
    assert (export.first_block, export.num_tokens) == (skip, len(prompt) - skip * 16)
    assert export.block_hashes == req.full_block_hashes(16, len(prompt))
    assert decode.accept_first_token("coarse", export.first_token, export.first_logprobs,
                                     sampler_state=export.sampler_state)
    decode.import_kv("coarse", export.blocks, export.num_tokens)
    _run(decode)
    assert req.output_token_ids == expected
    assert decode.stats().prompt_tokens_computed == computed_before  # the whole prompt came from elsewhere
    _assert_free(prefill, decode)


def test_finish_prefill_frees_the_blocks_when_the_read_fails(engines, monkeypatch: pytest.MonkeyPatch) -> None:
    prefill, _ = engines
    with pytest.raises(ValueError, match="not a held request"):
        prefill.finish_prefill("never-added")
    _held_prefill(prefill, "unread", random_prompts([70], 8192, seed=68)[0], GREEDY)

    def broken_read(ids: list[int]) -> torch.Tensor:
        raise RuntimeError("device lost")

    monkeypatch.setattr(prefill.kv_cache, "read_blocks", broken_read)
    with pytest.raises(RuntimeError, match="device lost"):
        prefill.finish_prefill("unread")
    _assert_free(prefill)


def test_import_kv_refuses_a_misfit_then_computes_without_it(engines) -> None:
    """A payload that does not fit changes nothing: the request stays deferred, an import without blocks
    computes it here, and no block is left behind."""
    _, decode = engines
    prompt = random_prompts([50], 8192, seed=69)[0]
    expected = _one_engine_tokens(prompt, GREEDY)
    req = decode.add_request(prompt, GREEDY, "misfit", defer=True)
    with pytest.raises(ValueError, match="does not fit"):
        decode.import_kv("misfit", torch.zeros(decode.layout.blocks_shape(3)), 50)
    assert req.pending_kv is None and decode.stats().num_requests_deferred == 1
    decode.import_kv("misfit")
    _run(decode)
    assert req.output_token_ids == expected
    decode.import_kv("misfit")  # ended: nothing to do, as for a request its first token ended
    _assert_free(decode)


def test_engine_info_and_load(engines) -> None:
    _, decode = engines
    info = decode.info()
    assert (info.block_size, info.layout, info.kv_dtype) == (16, decode.layout, torch.float32)
    load = decode.load()
    assert (load.kv_free_blocks, load.kv_usage, load.num_waiting) == (decode.stats().num_blocks_total, 0.0, 0)


def test_blocks_read_between_chunks_equal_the_finished_prefill(engines) -> None:
    """Chunked prefill (a 32-token budget: two blocks a step): after each step the computed full prompt blocks
    can be read while the request keeps them, and they equal what finish_prefill exports at the end; the
    last prompt token's block is never among them before the final step. Reads outside them change nothing."""
    prompt = random_prompts([100], 8192, seed=63)[0]
    engine = Engine(EngineConfig(max_num_batched_tokens=32))
    engine.add_request(prompt, SamplingParams(temperature=0.0, max_tokens=1), "chunked", hold_kv=True)
    pieces, done = [], 0
    while engine.has_unfinished_requests():
        engine.step()
        now = engine.computed_prompt_blocks("chunked")
        if now is None:  # the final step: held now
            break
        assert now < -(-len(prompt) // 16)
        if now > done:
            pieces.append(engine.read_request_blocks("chunked", done, now))
            done = now
    assert done == 6 and len(pieces) == 3  # blocks [0, 2), [2, 4), [4, 6) before the final step (tokens 96-99)
    with pytest.raises(ValueError):
        engine.read_request_blocks("chunked", 0, 1)  # held, no longer unfinished
    export = engine.finish_prefill("chunked", 0)
    assert torch.equal(torch.cat(pieces, dim=2), export.blocks[:, :, :done])
    _assert_free(engine)

"""Sampler and stop conditions: seeds, top-k/top-p, stop tokens and strings, max_tokens, eos.

The batched sampler (engine/sampler.py) is checked against the per-row reference it replaced
(bench/sampler_reference.py): the same greedy tokens, the same distributions by a total-variation bound
over many draws, the same top-k/top-p masks, the same logprobs. Every random draw here comes from a fixed
seed, so no test depends on luck.
"""

from __future__ import annotations

import math

import pytest
import torch

from bench.sampler_reference import ReferenceSampler, reference_logprobs, reference_probs
from engine import LLM, SamplingParams
from engine.config import GREEDY_BELOW
from engine.request import Request
from engine.sampler import Sampler, SamplingError, race, sample_scores
from tests.engine_helpers import assert_all_free, random_prompts


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM()


@pytest.fixture(autouse=True)
def _blocks_free_after(llm: LLM):
    yield
    assert_all_free(llm)


def _prompts(llm: LLM, n: int = 3) -> list[list[int]]:
    return random_prompts([20, 40, 70, 9, 33][:n], llm.engine.vocab_size, seed=21)


def test_seeded_sampling_is_reproducible_whatever_the_batch(llm: LLM) -> None:
    params = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, seed=1234, max_tokens=16, ignore_eos=True)
    prompts = _prompts(llm, 5)
    alone = llm.generate([prompts[0]], params)[0].outputs[0].token_ids
    batched = llm.generate(prompts, params)[0].outputs[0].token_ids
    assert alone == batched
    other_seed = llm.generate([prompts[0]], SamplingParams(temperature=0.9, seed=99, max_tokens=16,
                                                          ignore_eos=True))[0].outputs[0].token_ids
    assert other_seed != alone


def test_top_k_one_and_tiny_top_p_are_greedy(llm: LLM) -> None:
    prompts = _prompts(llm)
    greedy = [o.outputs[0].token_ids for o in llm.generate(prompts, SamplingParams(temperature=0, max_tokens=10,
                                                                                   ignore_eos=True))]
    top_k = llm.generate(prompts, SamplingParams(temperature=1.5, top_k=1, seed=3, max_tokens=10, ignore_eos=True))
    top_p = llm.generate(prompts, SamplingParams(temperature=1.5, top_p=1e-6, seed=3, max_tokens=10, ignore_eos=True))
    assert [o.outputs[0].token_ids for o in top_k] == greedy
    assert [o.outputs[0].token_ids for o in top_p] == greedy


def test_high_temperature_spreads_tokens(llm: LLM) -> None:
    prompt = _prompts(llm, 1)
    firsts = {llm.generate(prompt, SamplingParams(temperature=2.0, seed=s, max_tokens=1))[0].outputs[0].token_ids[0]
              for s in range(12)}
    assert len(firsts) > 3


def test_max_tokens_and_length_reason(llm: LLM) -> None:
    out = llm.generate(_prompts(llm, 1), SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))[0]
    assert len(out.outputs[0].token_ids) == 5 and out.outputs[0].finish_reason == "length"


def test_stop_token_ids(llm: LLM) -> None:
    prompt = _prompts(llm, 1)
    free_run = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0]
    stop_at = free_run.outputs[0].token_ids[4]
    out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[stop_at],
                                              ignore_eos=True))[0].outputs[0]
    first = free_run.outputs[0].token_ids.index(stop_at)
    assert out.token_ids == free_run.outputs[0].token_ids[: first + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_at


def test_stop_string_cuts_text(llm: LLM) -> None:
    prompt = _prompts(llm, 1)
    free_text = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))[0].outputs[0].text
    stop = free_text[len(free_text) // 2: len(free_text) // 2 + 3]
    assert stop.strip(), "the model's text is too short for this test"
    out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=20, stop=[stop], ignore_eos=True))[0]
    completion = out.outputs[0]
    assert completion.finish_reason == "stop" and completion.stop_reason == stop
    assert completion.text == free_text[: free_text.find(stop)]
    assert stop not in completion.text


def test_eos_stops_unless_ignored(llm: LLM) -> None:
    # Which token the random model emits is arbitrary, so make its 4th greedy token the eos.
    prompt = _prompts(llm, 1)[0]
    free_run = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))[0]
    natural = free_run.outputs[0].token_ids[3]
    saved = llm.engine.eos_token_ids
    llm.engine.eos_token_ids = {natural}
    try:
        stopped = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=10))[0].outputs[0]
        ignored = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))[0].outputs[0]
    finally:
        llm.engine.eos_token_ids = saved
    assert stopped.finish_reason == "stop" and stopped.token_ids[-1] == natural
    assert len(stopped.token_ids) <= 4
    assert ignored.finish_reason == "length" and len(ignored.token_ids) == 10


def test_string_prompts_and_text_output(llm: LLM) -> None:
    out = llm.generate("The scheduler admits requests while", SamplingParams(temperature=0, max_tokens=8,
                                                                            ignore_eos=True))[0]
    assert out.prompt_token_ids == llm.tokenizer.encode("The scheduler admits requests while",
                                                        add_special_tokens=False)
    assert out.outputs[0].text == llm.tokenizer.decode(out.outputs[0].token_ids, skip_special_tokens=True)


def test_per_prompt_sampling_params(llm: LLM) -> None:
    prompts = _prompts(llm, 2)
    outs = llm.generate(prompts, [SamplingParams(temperature=0, max_tokens=3, ignore_eos=True),
                                  SamplingParams(temperature=0, max_tokens=7, ignore_eos=True)])
    assert [len(o.outputs[0].token_ids) for o in outs] == [3, 7]


# ---- the batched sampler on its own ---------------------------------------------------------------
def _req(rid: str, **params) -> Request:
    return Request(rid, [1], SamplingParams(**params), b"", 1 << 20)


def _logits(rows: int, vocab: int, seed: int, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * scale


MIXED = [dict(temperature=0.0), dict(temperature=0.7), dict(temperature=0.9, top_p=0.95),
         dict(temperature=1.0, top_k=50), dict(temperature=0.8, top_k=40, top_p=0.9, seed=7),
         dict(temperature=1.0, top_p=0.9, logprobs=5), dict(temperature=0.0, logprobs=2)]


def test_greedy_rows_equal_the_reference() -> None:
    logits = _logits(28, 3000, seed=1)
    logits[7, 4:10] = logits[7].max() + 1.0  # ties (row 7 is greedy): the first index wins, as argmax does
    requests = [_req(f"g{i}", **MIXED[i % len(MIXED)]) for i in range(len(logits))]
    got, ref = Sampler(0)(logits, requests), ReferenceSampler(0)(logits, requests)
    for req, g, r in zip(requests, got, ref, strict=True):
        if req.sampling_params.greedy:
            assert g == r  # token and logprobs alike
    assert got[7][0] == 4


# Each case: (temperature, top_k, top_p) on one row of 8 logits. The bound: with N draws from K outcomes the
# expected total-variation distance of the frequencies from the true distribution is at most
# 0.5 * sqrt(K / N) (0.010 for 20000 draws, 0.014 for 10000); the test allows 3x that. Masked tokens must
# never be drawn.
DIST_CASES = [(1.0, 0, 1.0), (0.7, 3, 1.0), (1.3, 0, 0.8), (0.9, 5, 0.6), (2.0, 0, 1.0)]
DIST_LOGITS = torch.tensor([1.2, -0.3, 2.0, 0.4, -1.5, 0.9, 0.0, -0.7])


@pytest.mark.parametrize("temperature, top_k, top_p", DIST_CASES)
def test_distribution_matches_the_reference(temperature: float, top_k: int, top_p: float) -> None:
    expected = reference_probs(DIST_LOGITS, temperature, top_k, top_p)
    vocab = len(DIST_LOGITS)
    params = dict(temperature=temperature, top_k=top_k, top_p=top_p)
    sampler = Sampler(5)
    # unseeded: 40 calls of 500 rows from the sampler's generator
    batch = [_req(f"u{i}", **params) for i in range(500)]
    unseeded = [t for _ in range(40) for t, _ in sampler(DIST_LOGITS.expand(500, vocab), batch)]
    # seeded: 200 requests, each its own generator, 50 tokens each
    seeded_batch = [_req(f"s{i}", seed=1000 + i, **params) for i in range(200)]
    seeded = [t for _ in range(50) for t, _ in sampler(DIST_LOGITS.expand(200, vocab), seeded_batch)]
    for draws in (unseeded, seeded):
        freq = torch.bincount(torch.tensor(draws), minlength=vocab).double() / len(draws)
        tv = 0.5 * (freq - expected.double()).abs().sum().item()
        assert tv < 3 * 0.5 * math.sqrt(vocab / len(draws)), (tv, freq, expected)
        assert freq[expected == 0].sum() == 0


def test_seeded_rows_do_not_depend_on_the_batch() -> None:
    vocab = 2000
    mine = dict(temperature=0.9, top_k=100, top_p=0.9, seed=2**70 + 3, logprobs=3)
    alone_req, batched_req = _req("alone", **mine), _req("batched", **mine)
    alone, batched = Sampler(0), Sampler(1)
    for step in range(6):
        row = _logits(1, vocab, seed=100 + step)
        others = [_req(f"o{step}-{i}", **MIXED[(i + step) % len(MIXED)]) for i in range(5 + step)]
        position = step % (len(others) + 1)
        requests = others[:position] + [batched_req] + others[position:]
        logits = _logits(len(requests), vocab, seed=200 + step)
        logits[position] = row[0]
        assert batched(logits, requests)[position] == alone(row, [alone_req])[0]


def _finite(scores: torch.Tensor) -> set[int]:
    return set(torch.nonzero(torch.isfinite(scores)).flatten().tolist())


# probabilities chosen so that no cumulative mass lands on a top_p below: the masks are exact
MASK_PROBS = torch.tensor([0.05, 0.25, 0.015, 0.4, 0.1, 0.005, 0.15, 0.03])


@pytest.mark.parametrize("top_k, top_p, kept", [
    (0, 1.0, {0, 1, 2, 3, 4, 5, 6, 7}),
    (3, 1.0, {3, 1, 6}),
    (1, 1.0, {3}),
    (8, 1.0, {0, 1, 2, 3, 4, 5, 6, 7}),
    (0, 0.6, {3, 1}),  # mass before the 3rd token: 0.65 >= 0.6
    (0, 0.66, {3, 1, 6}),
    (0, 0.3, {3}),
    (0, 1e-300, {3}),  # rounds to 0 in float32: the top token stays
    (4, 0.75, {3, 1, 6}),  # within the top 4 renormalised (/0.9): 0.444, 0.278, 0.167, 0.111: 0.722 before the 3rd
    (4, 0.70, {3, 1}),
    (4, 0.73, {3, 1, 6}),
    (2, 0.99, {3, 1}),
])
def test_top_k_top_p_masks_are_exact(top_k: int, top_p: float, kept: set[int]) -> None:
    logits = MASK_PROBS.log()[None]
    vocab = logits.shape[1]
    scores = sample_scores(logits, logits.amax(-1), torch.ones(1), torch.tensor([float(top_k or vocab)]),
                           torch.tensor([top_p if top_p < 1 else math.inf]), torch.tensor([0]))
    assert _finite(scores[0]) == kept
    assert set(torch.nonzero(reference_probs(logits[0], 1.0, top_k, top_p)).flatten().tolist()) == kept


def test_ties_at_the_cut_stay() -> None:
    logits = torch.tensor([[3.0, 1.0, 3.0, 3.0, 0.0]])
    scores = sample_scores(logits, logits.amax(-1), torch.ones(1), torch.tensor([2.0]), torch.tensor([math.inf]),
                           torch.tensor([0]))
    assert _finite(scores[0]) == {0, 2, 3}


def test_broken_rows_fail_alone() -> None:
    vocab = 500
    requests = [_req(f"b{i}", **MIXED[i % len(MIXED)]) for i in range(10)]
    seeded = next(i for i, r in enumerate(requests) if r.sampling_params.seed is not None)
    clean = _logits(len(requests), vocab, seed=3)
    logits = clean.clone()
    logits[1, 7] = float("nan")
    logits[2, 9] = float("inf")
    logits[3] = float("-inf")
    twin = _req("twin", **MIXED[seeded % len(MIXED)])
    out = Sampler(0)(logits, requests)
    for i, result in enumerate(out):
        assert isinstance(result, SamplingError) == (i in (1, 2, 3)), (i, result)
        if i in (1, 2, 3):
            assert requests[i].request_id in str(result)
        elif requests[i].sampling_params.greedy:
            assert result[0] == int(clean[i].argmax())
    assert out[seeded] == Sampler(9)(clean[seeded:seeded + 1], [twin])[0]


def test_in_range_extremes_never_raise() -> None:
    vocab = 300
    logits = _logits(7, vocab, seed=4)
    logits[0, 5] = 3e38  # huge logits, a temperature just above greedy
    logits[0, 6] = -3e38
    logits[1, :100] = float("-inf")  # some masked logits are fine
    requests = [_req("tiny-t", temperature=GREEDY_BELOW * 1.0001, seed=1),
                _req("masked", temperature=1.0, top_p=0.5),
                _req("tiny-p", temperature=1.0, top_p=1e-300),
                _req("k1", temperature=1.7, top_k=1),
                _req("k-past", temperature=0.5, top_k=10**9, top_p=1.0, logprobs=20),
                _req("hot", temperature=1e308),
                _req("all", temperature=1.0, top_k=vocab, top_p=0.999999)]
    out = Sampler(0)(logits, requests)
    assert not [r for r in out if isinstance(r, SamplingError)], out
    argmax = logits.argmax(-1).tolist()
    assert out[0][0] == 5 and out[1][0] >= 100
    assert out[2][0] == argmax[2] and out[3][0] == argmax[3]
    assert len(out[4][1]) >= 20


def test_logprobs_match_log_softmax() -> None:
    vocab = 1000
    logits = _logits(6, vocab, seed=8)
    asks = [None, 0, 3, 20, 7, 1]
    requests = [_req(f"l{i}", temperature=0.0 if i % 2 else 0.8, top_k=0 if i % 3 else 20, logprobs=n, seed=i)
                for i, n in enumerate(asks)]
    out = Sampler(0)(logits, requests)
    small = Sampler(0)(logits[:2, :8], [_req("few", temperature=0.0, logprobs=20), requests[2]])
    assert len(small[0][1]) == 8 and small[1][1] is not None  # asking past the vocabulary gets all of it
    for i, (token, logprobs) in enumerate(out):
        if asks[i] is None:
            assert logprobs is None
            continue
        expected = reference_logprobs(logits[i], token, asks[i])
        assert list(logprobs) == list(expected)  # the sampled token first, then the top ones by rank
        assert list(logprobs.values()) == pytest.approx(list(expected.values()), abs=1e-6)
        assert logprobs[token] == pytest.approx(float(torch.log_softmax(logits[i], -1)[token]), abs=1e-6)


def test_tensor_part_runs_on_meta_and_refuses_other_devices() -> None:
    n, m, vocab = 4, 2, 49152
    meta = torch.device("meta")
    logits = torch.empty(n, vocab, device=meta)
    args = (logits, logits.amax(-1), torch.empty(n, device=meta), torch.empty(m, device=meta),
            torch.empty(m, device=meta), torch.empty(m, dtype=torch.long, device=meta))
    scores = sample_scores(*args)
    assert scores.device == meta and scores.shape == (n, vocab)
    tokens = race(scores, torch.empty(n, vocab, device=meta))
    assert tokens.device == meta and tokens.shape == (n,)
    for i in range(1, len(args)):  # a CPU tensor mixed in, in any place
        mixed = list(args)
        mixed[i] = torch.zeros(mixed[i].shape, dtype=mixed[i].dtype)
        with pytest.raises(ValueError, match="device"):
            sample_scores(*mixed)
    with pytest.raises(ValueError, match="device"):
        race(scores, torch.ones(n, vocab))
    # the whole sampler: every op up to the device -> host copy runs on meta (a CPU tensor mixed in would
    # raise a device error first), and no request's generator is made there
    requests = [_req(f"m{i}", **MIXED[i % len(MIXED)]) for i in range(len(MIXED))]
    with pytest.raises(NotImplementedError, match="meta"):
        Sampler(0)(torch.empty(len(requests), vocab, device=meta), requests)
    assert all(r.generator is None for r in requests)


def test_one_device_to_host_copy_per_call(monkeypatch) -> None:
    calls = []
    tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: calls.append(self.shape) or tolist(self))
    monkeypatch.setattr(torch.Tensor, "item", lambda self: pytest.fail("item() syncs the device"))
    requests = [_req(f"c{i}", **MIXED[i % len(MIXED)]) for i in range(12)]
    Sampler(0)(_logits(len(requests), 700, seed=12), requests)
    assert len(calls) == 1


def test_generator_is_made_on_first_use_and_its_state_carries_over() -> None:
    params = dict(temperature=1.0, top_p=0.95, seed=-5)
    vocab = 400
    steps = [_logits(1, vocab, seed=300 + s) for s in range(5)]
    one = _req("one", **params)
    assert one.generator is None and one.sampler_state() is None  # nothing drawn: the seed alone restores it
    sampler = Sampler(0)
    reference = [sampler(row, [one])[0][0] for row in steps]
    assert one.generator is not None and one.generator.device == torch.device("cpu")
    with pytest.raises(ValueError, match="samples on"):
        one.generator_on(torch.device("meta"))

    first = _req("first", **params)  # draws the first two tokens, then hands over
    tokens = [sampler(row, [first])[0][0] for row in steps[:2]]
    state = first.sampler_state()
    cont = _req("cont", **params)
    cont.restore_sampler_state(state)  # before its generator exists: kept until the first draw
    tokens += [sampler(row, [cont])[0][0] for row in steps[2:]]
    assert tokens == reference

    unseeded = _req("unseeded", temperature=1.0)
    unseeded.restore_sampler_state(state)
    assert unseeded.generator_on(torch.device("cpu")) is None and unseeded.sampler_state() is None


def test_bad_carried_state_fails_its_request_alone() -> None:
    bad, good = _req("bad", temperature=1.0, seed=1), _req("good", temperature=0.0)
    bad.restore_sampler_state(b"not a generator state")
    out = Sampler(0)(_logits(2, 50, seed=9), [bad, good])
    assert isinstance(out[0], SamplingError) and "bad" in str(out[0])
    assert not isinstance(out[1], SamplingError)

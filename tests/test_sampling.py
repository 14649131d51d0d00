"""Sampler and stop conditions: seeds, top-k/top-p, stop tokens and strings, max_tokens, eos."""

from __future__ import annotations

import pytest

from engine import LLM, SamplingParams
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

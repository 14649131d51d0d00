"""Bad input: a ValueError naming the field and the limit, and nothing allocated or queued."""

from __future__ import annotations

import pytest

from engine import LLM, SamplingParams
from tests.engine_helpers import assert_all_free


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(max_model_len=256)


@pytest.mark.parametrize("kwargs, message", [
    ({"max_tokens": 0}, "max_tokens"),
    ({"temperature": -0.1}, "temperature"),
    ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -1}, "top_k"),
    ({"n": 0}, "n must be"),
    ({"stop": [""]}, "stop"),
])
def test_bad_sampling_params(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("prompt, message", [
    ([], "at least 1 token"),
    ("", "at least 1 token"),
    (list(range(3, 300)), "max_model_len=256"),
    ([5, -1, 7], "outside the vocabulary"),
    ([5, 10**9], "outside the vocabulary"),
])
def test_bad_prompts_allocate_nothing(llm: LLM, prompt, message: str) -> None:
    good = [5, 6, 7]
    with pytest.raises(ValueError, match=message):
        llm.generate([good, prompt], SamplingParams(max_tokens=2))
    assert_all_free(llm)
    assert llm.stats().prefix_cache_queries == 0 and llm.stats().num_generated_tokens == 0


def test_mismatched_params_list(llm: LLM) -> None:
    with pytest.raises(ValueError, match="2 sampling_params for 1 prompts"):
        llm.generate([[5, 6]], [SamplingParams(), SamplingParams()])
    assert_all_free(llm)


def test_generation_stops_at_max_model_len(llm: LLM) -> None:
    out = llm.generate([list(range(3, 250))], SamplingParams(temperature=0, max_tokens=100, ignore_eos=True))[0]
    assert len(out.outputs[0].token_ids) == 256 - 247 and out.outputs[0].finish_reason == "length"
    assert_all_free(llm)

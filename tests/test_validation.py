"""Bad input: a ValueError naming the field and the limit, and nothing allocated or queued."""

from __future__ import annotations

import pytest

from engine import LLM, SamplingParams
from engine.config import EngineConfig, error_message
from tests.engine_helpers import assert_all_free


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(max_model_len=256)


@pytest.mark.parametrize("kwargs, message", [
    ({"max_tokens": 0}, "max_tokens: Input should be greater than or equal to 1"),
    ({"temperature": -0.1}, "temperature: Input should be greater than or equal to 0"),
    ({"top_p": 0.0}, "top_p: Input should be greater than 0"),
    ({"top_p": 1.5}, "top_p: Input should be less than or equal to 1"),
    ({"top_k": -1}, "top_k: Input should be greater than or equal to 0"),
    ({"n": 0}, "n: Input should be greater than or equal to 1"),
    ({"stop": [""]}, "stop.0: String should have at least 1 character"),
    ({"stop_token_ids": [-1]}, "stop_token_ids.0: Input should be greater than or equal to 0"),
    ({"logprobs": 21}, "logprobs: Input should be less than or equal to 20"),
    ({"max_tokens": 2.5}, "max_tokens: Input should be a valid integer"),
    ({"temprature": 0.5}, "temprature: Unexpected keyword argument"),
])
def test_bad_sampling_params(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError) as info:
        SamplingParams(**kwargs)
    assert error_message(info.value) == message or error_message(info.value).startswith(message)


def test_sampling_params_take_lists_or_one_string_and_store_tuples() -> None:
    params = SamplingParams(stop="###", stop_token_ids=[7, 8])
    assert params.stop == ("###",) and params.stop_token_ids == (7, 8)
    assert SamplingParams(stop=None).stop == () and hash(params) == hash(SamplingParams(stop=("###",),
                                                                                         stop_token_ids=(7, 8)))


@pytest.mark.parametrize("kwargs, message", [
    ({"block_size": 3}, "block_size must be a power of two >= 1, got 3"),
    ({"max_num_seqs": 0}, "max_num_seqs: Input should be greater than or equal to 1"),
    ({"dtype": "int8"}, "dtype: Input should be 'auto', 'float32', 'bfloat16' or 'float16'"),
    ({"kv_cache_byte": 1}, "kv_cache_byte: Unexpected keyword argument"),
])
def test_bad_engine_configs(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError) as info:
        EngineConfig(**kwargs)
    assert error_message(info.value) == message


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

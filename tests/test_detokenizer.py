"""IncrementalDetokenizer: streamed deltas add up to the text, never split a character, cost O(n).

Three tokenizers: the built-in one and SmolLM2's (decoded by tokenizers' DecodeStream), and the
built-in one asking for transformers' clean-up of tokenization spaces (decoded window by window).
"""

from __future__ import annotations

import functools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from cluster.detokenizer import REPLACEMENT, IncrementalDetokenizer, _Streamed, _Windowed
from engine.models import resolve

TEXT = "héllo wörld 日本語 😀 done, and more plain words after the emoji 🎉 fin"


TOKENIZERS = {"tiny": ("tiny", {}), "smollm2": ("smollm2-135m-instruct", {}),
              "tiny-clean-up": ("tiny", {"clean_up_tokenization_spaces": True})}


@functools.cache
def tokenizer(name: str = "tiny"):
    model, kwargs = TOKENIZERS[name]
    return AutoTokenizer.from_pretrained(resolve(model), local_files_only=True, **kwargs)


class CountingTokenizer:
    """The real tokenizer, counting the tokens it is asked to decode."""

    def __init__(self, inner) -> None:
        self.inner, self.decoded = inner, 0

    def decode(self, ids, **kwargs) -> str:
        self.decoded += len(ids)
        return self.inner.decode(ids, **kwargs)


def _stream(ids: list[int], chunks: list[int], stop: list[str] | None = None,
            name: str = "tiny") -> tuple[list[str], str]:
    detok = IncrementalDetokenizer(tokenizer(name), stop)
    deltas, i = [], 0
    for size in chunks:
        if i >= len(ids):
            break
        deltas.append(detok.add(ids[i:i + size]))
        i += size
    if i < len(ids):
        deltas.append(detok.add(ids[i:]))
    final = tokenizer(name).decode(ids, skip_special_tokens=True)
    return deltas, detok.finish(final)


def test_each_tokenizer_takes_the_decoder_that_gives_its_own_text() -> None:
    assert isinstance(IncrementalDetokenizer(tokenizer("tiny"))._decode, _Streamed)
    assert isinstance(IncrementalDetokenizer(tokenizer("smollm2"))._decode, _Streamed)
    assert isinstance(IncrementalDetokenizer(tokenizer("tiny-clean-up"))._decode, _Windowed)


@pytest.mark.parametrize("name", TOKENIZERS)
@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 8191), max_size=60), st.lists(st.integers(1, 4), min_size=1, max_size=60))
def test_deltas_add_up_to_the_text_and_never_end_mid_character(name: str, ids: list[int], chunks: list[int]) -> None:
    deltas, rest = _stream(ids, chunks, name=name)
    full = tokenizer(name).decode(ids, skip_special_tokens=True)
    assert "".join(deltas) + rest == full
    assert all(not d.endswith(REPLACEMENT) for d in deltas)


@pytest.mark.parametrize("name", TOKENIZERS)
def test_multibyte_characters_split_across_tokens_come_out_whole(name: str) -> None:
    ids = tokenizer(name).encode(TEXT, add_special_tokens=False)
    deltas, rest = _stream(ids, [1] * len(ids), name=name)
    assert "".join(deltas) + rest == TEXT
    assert "日本語" in "".join(deltas) and "😀" in "".join(deltas)
    assert all(REPLACEMENT not in d for d in deltas)


def test_text_that_may_start_a_stop_string_is_held_back() -> None:
    ids = tokenizer().encode(TEXT, add_special_tokens=False)
    deltas, _ = _stream(ids, [1] * len(ids), stop=["STOP!"])
    emitted = "".join(deltas)
    assert TEXT.startswith(emitted) and len(emitted) <= len(TEXT) - 4  # the last 4 characters wait for the end


def test_cost_is_linear_in_the_output_length() -> None:
    ids = tokenizer().encode(TEXT * 40, add_special_tokens=False)
    counting = CountingTokenizer(tokenizer())
    detok = IncrementalDetokenizer(counting)
    text = "".join(detok.add([t]) for t in ids)
    assert text + detok.finish(TEXT * 40) == TEXT * 40
    assert counting.decoded < 12 * len(ids), f"{counting.decoded} tokens decoded for {len(ids)} streamed"

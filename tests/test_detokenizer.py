"""IncrementalDetokenizer: streamed deltas add up to the text, never split a character, cost O(n)."""

from __future__ import annotations

import functools

from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from cluster.detokenizer import REPLACEMENT, IncrementalDetokenizer
from engine.tiny_model import path

TEXT = "héllo wörld 日本語 😀 done, and more plain words after the emoji 🎉 fin"


@functools.cache
def tokenizer():
    return AutoTokenizer.from_pretrained(path("tiny"), local_files_only=True)


class CountingTokenizer:
    """The real tokenizer, counting the tokens it is asked to decode."""

    def __init__(self, inner) -> None:
        self.inner, self.decoded = inner, 0

    def decode(self, ids, **kwargs) -> str:
        self.decoded += len(ids)
        return self.inner.decode(ids, **kwargs)


def _stream(ids: list[int], chunks: list[int], stop: list[str] | None = None) -> tuple[list[str], str]:
    detok = IncrementalDetokenizer(tokenizer(), stop)
    deltas, i = [], 0
    for size in chunks:
        if i >= len(ids):
            break
        deltas.append(detok.add(ids[i:i + size]))
        i += size
    if i < len(ids):
        deltas.append(detok.add(ids[i:]))
    final = tokenizer().decode(ids, skip_special_tokens=True)
    return deltas, detok.finish(final)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 8191), max_size=60), st.lists(st.integers(1, 4), min_size=1, max_size=60))
def test_deltas_add_up_to_the_text_and_never_end_mid_character(ids: list[int], chunks: list[int]) -> None:
    deltas, rest = _stream(ids, chunks)
    full = tokenizer().decode(ids, skip_special_tokens=True)
    assert "".join(deltas) + rest == full
    assert all(not d.endswith(REPLACEMENT) for d in deltas)


def test_multibyte_characters_split_across_tokens_come_out_whole() -> None:
    ids = tokenizer().encode(TEXT, add_special_tokens=False)
    deltas, rest = _stream(ids, [1] * len(ids))
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

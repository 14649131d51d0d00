"""User texts of an exact token length for a given tokenizer, for HTTP benchmarks.

An HTTP endpoint takes text, not token ids, so a benchmark that wants a user
prompt of n tokens must write text that tokenizes to exactly n tokens. The
built-in tokenizer is byte-level BPE whose pre-tokenizer splits text at spaces
before merging, so a text of words separated by single spaces tokenizes word by
word. `WordBank` keeps the lower-case words that are one token both with and
without the leading space; n such words joined by spaces are exactly n tokens,
wherever the text starts. The bank is sorted, so it (and every text drawn from
it with a seeded `random.Random`) is a pure function of the tokenizer.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Protocol

MIN_WORD_CHARS = 3  # short pieces (e.g. "ab") are mostly word fragments, not words


class ChatTokenizer(Protocol):
    """What this module needs of a Hugging Face tokenizer."""

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...

    def get_vocab(self) -> dict[str, int]: ...

    def apply_chat_template(self, conversation: list[dict[str, str]], **kwargs: Any) -> Any: ...


@dataclass(frozen=True)
class WordBank:
    """Words that are one token each, at the start of a text and after a space."""

    words: tuple[str, ...]

    def text(self, num_tokens: int, rng: random.Random) -> str:
        """`num_tokens` words drawn uniformly with `rng`, joined by single spaces (exactly `num_tokens` tokens)."""
        if num_tokens < 0:
            raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
        return " ".join(rng.choice(self.words) for _ in range(num_tokens))


def word_bank(tokenizer: ChatTokenizer) -> WordBank:
    """The sorted single-token words of `tokenizer`; raises if it has too few to make varied text."""
    candidates = sorted({piece.lstrip("Ġ▁ ") for piece in tokenizer.get_vocab()})
    words = tuple(w for w in candidates if _is_single_token_word(tokenizer, w))
    if len(words) < 100:
        raise ValueError(f"tokenizer has only {len(words)} single-token words; need >= 100 for varied prompts")
    return WordBank(words)


def _is_single_token_word(tokenizer: ChatTokenizer, word: str) -> bool:
    if len(word) < MIN_WORD_CHARS or not (word.isascii() and word.isalpha() and word.islower()):
        return False
    return (len(tokenizer.encode(word, add_special_tokens=False)) == 1
            and len(tokenizer.encode(" " + word, add_special_tokens=False)) == 1)


def chat_prompt_len(tokenizer: ChatTokenizer, system: str, user: str) -> int:
    """Tokens of (system, user) through the tokenizer's chat template, with the assistant header."""
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": user})
    ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False)
    return len(ids)


def builtin_tokenizer() -> ChatTokenizer:
    """The built-in random models' tokenizer with its ChatML template."""
    return model_tokenizer("tiny")


@lru_cache(maxsize=4)
def model_tokenizer(model: str | None) -> ChatTokenizer:
    """The tokenizer of a `model:` setting (a name, a .gguf file or a folder: engine/models.py; None: tiny)."""
    from transformers import AutoTokenizer

    from engine.models import resolve

    return AutoTokenizer.from_pretrained(resolve(model), local_files_only=True)

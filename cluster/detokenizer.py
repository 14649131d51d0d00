"""Incremental detokenization for streaming: token ids in, text deltas out.

Invariants: the concatenation of all deltas equals the final text; a delta
never ends inside a multi-byte character (byte-level BPE can split one across
tokens: the decoder then shows U+FFFD, and we wait for the next token); with
stop strings, text that could be the start of a stop string is held back
until the request ends, so a stop string never leaks into the stream.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: list[str] | None = None) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._sent = 0  # characters of the text already emitted
        self._hold = max((len(s) for s in stop or []), default=1) - 1

    def add(self, token_ids: list[int]) -> str:
        """Append tokens; return the text that is now safe to emit."""
        self._ids.extend(token_ids)
        text = self._tokenizer.decode(self._ids, skip_special_tokens=True)
        if text.endswith(REPLACEMENT):
            return ""
        safe = len(text) - self._hold
        if safe <= self._sent:
            return ""
        delta = text[self._sent:safe]
        self._sent = safe
        return delta

    def finish(self, final_text: str) -> str:
        """The rest of the engine's final text (already cut at a stop string)."""
        delta = final_text[self._sent:] if len(final_text) > self._sent else ""
        self._sent = max(self._sent, len(final_text))
        return delta

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
    """Decodes only a short window per call, so a stream costs O(tokens), not O(tokens^2).

    The window is the tokens from `_prefix` on: text of [_prefix, _read) was
    already emitted (or held), and decoding the window with that prefix in
    front keeps tokenizers that merge spaces or bytes across tokens right.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: list[str] | None = None) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._prefix = 0  # window start (token index)
        self._read = 0  # tokens whose text is already in self._text
        self._text = ""  # all text decoded so far
        self._sent = 0  # characters of self._text already emitted
        self._hold = max((len(s) for s in stop or []), default=1) - 1

    def add(self, token_ids: list[int]) -> str:
        """Append tokens; return the text that is now safe to emit."""
        self._ids.extend(token_ids)
        self._advance()
        safe = len(self._text) - self._hold
        if safe <= self._sent:
            return ""
        delta = self._text[self._sent:safe]
        self._sent = safe
        return delta

    def _advance(self) -> None:
        decode = self._tokenizer.decode
        before = decode(self._ids[self._prefix:self._read], skip_special_tokens=True)
        window = decode(self._ids[self._prefix:], skip_special_tokens=True)
        if window.endswith(REPLACEMENT) or len(window) <= len(before):
            return  # a split character (wait for its next byte) or nothing visible yet
        self._text += window[len(before):]
        self._prefix, self._read = self._read, len(self._ids)

    def finish(self, final_text: str) -> str:
        """The rest of the engine's final text (already cut at a stop string)."""
        delta = final_text[self._sent:] if len(final_text) > self._sent else ""
        self._sent = max(self._sent, len(final_text))
        return delta

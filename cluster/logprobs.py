"""OpenAI's `logprobs` answers, from the engine's per-token logprobs.

The engine gives, per generated token, a dict token id -> logprob holding the sampled token and the
`top` most likely tokens (natural log of the model's distribution: a log-softmax of the logits, before
temperature and cuts, as vLLM reports by default). Here they become the chat shape (`content`: one entry
per token with its `top_logprobs`) or the completions shape (parallel `tokens`, `token_logprobs`,
`top_logprobs`, `text_offset` lists). A token's string is its id decoded alone, as vLLM shows it;
`bytes` are that string's UTF-8. A logprob of -inf (a token the model rules out) is reported as
MIN_LOGPROB: JSON has no infinities.
"""

from __future__ import annotations

import math
from typing import Any

MIN_LOGPROB = -9999.0


def _finite(logprob: float) -> float:
    return logprob if math.isfinite(logprob) else MIN_LOGPROB


class LogprobFormatter:
    """One sample's logprobs, in order: text offsets (completions) continue from one call to the next."""

    def __init__(self, tokenizer: Any, top: int) -> None:
        self._tokenizer, self._top = tokenizer, top
        self._offset = 0  # characters of token strings so far (completions' text_offset)

    def chat(self, token_ids: list[int], logprobs: list[dict[int, float]]) -> dict:
        return {"content": [self._chat_entry(t, lp) for t, lp in zip(token_ids, logprobs, strict=True)]}

    def completion(self, token_ids: list[int], logprobs: list[dict[int, float]]) -> dict:
        tokens, offsets = [], []
        for token_id in token_ids:
            text = self._text(token_id)
            tokens.append(text)
            offsets.append(self._offset)
            self._offset += len(text)
        return {"tokens": tokens,
                "token_logprobs": [_finite(lp[t]) for t, lp in zip(token_ids, logprobs, strict=True)],
                "top_logprobs": [{self._text(t): _finite(v) for t, v in self._most_likely(lp)} for lp in logprobs],
                "text_offset": offsets}

    def _chat_entry(self, token_id: int, logprobs: dict[int, float]) -> dict:
        entry = self._token(token_id, logprobs[token_id])
        entry["top_logprobs"] = [self._token(t, v) for t, v in self._most_likely(logprobs)]
        return entry

    def _token(self, token_id: int, logprob: float) -> dict:
        text = self._text(token_id)
        return {"token": text, "logprob": _finite(logprob), "bytes": list(text.encode())}

    def _most_likely(self, logprobs: dict[int, float]) -> list[tuple[int, float]]:
        return sorted(logprobs.items(), key=lambda item: -item[1])[:self._top]

    def _text(self, token_id: int) -> str:
        return self._tokenizer.decode([token_id])

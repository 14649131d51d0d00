"""Next-token sampling: greedy, temperature, top-k, top-p, per-request seeds, logprobs.

Rows are independent: a request's tokens depend only on its logits and its
own generator (seeded requests), never on what else is in the batch.
"""

from __future__ import annotations

import torch

from engine.request import Request


class Sampler:
    def __init__(self, seed: int) -> None:
        self._generator = torch.Generator().manual_seed(seed)  # for requests without a seed

    def __call__(self, logits: torch.Tensor, requests: list[Request]) -> list[tuple[int, dict[int, float] | None]]:
        """logits [S, vocab] float32, one row per request -> (token id, logprobs or None) per row."""
        greedy_tokens = logits.argmax(dim=-1).tolist()
        out = []
        for i, req in enumerate(requests):
            params = req.sampling_params
            row = logits[i]
            token = greedy_tokens[i] if params.greedy else self._sample(row, req)
            logprobs = None
            if params.logprobs is not None:
                logprobs = _logprobs(row, token, params.logprobs)
            out.append((token, logprobs))
        return out

    def _sample(self, row: torch.Tensor, req: Request) -> int:
        params = req.sampling_params
        row = row / params.temperature
        if params.top_k and params.top_k < row.numel():
            kth = torch.topk(row, params.top_k).values[-1]
            row = row.masked_fill(row < kth, float("-inf"))
        if params.top_p < 1.0:
            sorted_logits, order = torch.sort(row, descending=True)
            probs = sorted_logits.softmax(-1)
            # drop tokens once the mass before them already reaches top_p (the top token always stays)
            drop = (probs.cumsum(-1) - probs) >= params.top_p
            row = row.scatter(0, order[drop], float("-inf"))
        probs = row.softmax(-1)
        generator = req.generator or self._generator
        return int(torch.multinomial(probs, 1, generator=generator))


def _logprobs(row: torch.Tensor, token: int, top: int) -> dict[int, float]:
    """The sampled token's log-probability under the model, plus the `top` most likely tokens."""
    lp = torch.log_softmax(row, dim=-1)
    result = {token: float(lp[token])}
    if top:
        values, ids = torch.topk(lp, top)
        for v, t in zip(values.tolist(), ids.tolist(), strict=True):
            result.setdefault(t, v)
    return result

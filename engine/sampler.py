"""Next-token sampling: greedy, temperature, top-k, top-p, per-request seeds, logprobs.

Rows are independent: a request's tokens depend only on its logits and its
own generator (seeded requests), never on what else is in the batch. A row
that cannot be sampled (logits that are NaN or +inf, from a model gone
numerically wrong) gives a SamplingError for that request alone.
"""

from __future__ import annotations

import torch

from engine.request import Request

Sampled = tuple[int, dict[int, float] | None]


class SamplingError(RuntimeError):
    """One request's row could not be sampled; the other rows are unaffected."""


class Sampler:
    def __init__(self, seed: int) -> None:
        self._generator = torch.Generator().manual_seed(seed)  # for requests without a seed

    def __call__(self, logits: torch.Tensor, requests: list[Request]) -> list[Sampled | SamplingError]:
        """logits [S, vocab] float32, one row per request -> (token id, logprobs or None), or the row's error."""
        greedy_tokens = logits.argmax(dim=-1).tolist()
        broken = (torch.isnan(logits) | torch.isposinf(logits)).any(dim=-1).tolist()
        out: list[Sampled | SamplingError] = []
        for i, req in enumerate(requests):
            if broken[i]:
                out.append(SamplingError(f"the model's logits for request {req.request_id!r} are not finite"))
                continue
            params = req.sampling_params
            row = logits[i]
            try:
                token = greedy_tokens[i] if params.greedy else self._sample(row, req)
            except RuntimeError as exc:  # torch refused this row's distribution: this request fails, not the batch
                out.append(SamplingError(f"sampling request {req.request_id!r} failed: {exc}"))
                continue
            out.append((token, None if params.logprobs is None else _logprobs(row, token, params.logprobs)))
        return out

    def _sample(self, row: torch.Tensor, req: Request) -> int:
        params = req.sampling_params
        row = row / params.temperature  # >= GREEDY_BELOW (config.py): finite for finite logits
        if params.top_k and params.top_k < row.numel():
            kth = torch.topk(row, params.top_k).values[-1]
            row = row.masked_fill(row < kth, float("-inf"))
        if params.top_p < 1.0:
            sorted_logits, order = torch.sort(row, descending=True)
            probs = sorted_logits.softmax(-1)
            # drop tokens once the mass before them already reaches top_p; the top token always stays, also
            # when top_p rounds to 0 in float32 (1e-300 does, and 0 >= 0 would drop every token)
            drop = (probs.cumsum(-1) - probs) >= params.top_p
            drop[0] = False
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

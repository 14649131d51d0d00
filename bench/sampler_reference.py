"""The per-row sampler the engine used before the batched one (engine/sampler.py), kept as the reference
that tests/test_sampling.py and bench/sampler.py measure the batched sampler against.

Each row is sampled on its own with a Python loop: temperature, top-k (ties with the k-th token stay),
top-p over the sorted top-k distribution (the top token always stays), then an inverse-CDF draw
(torch.multinomial) from the row's generator. Same return type as engine.sampler.Sampler. Not used by
the engine.
"""

from __future__ import annotations

import torch

from engine.request import Request
from engine.sampler import Sampled, SamplingError


class ReferenceSampler:
    def __init__(self, seed: int) -> None:
        self._generator = torch.Generator().manual_seed(seed)  # for requests without a seed

    def __call__(self, logits: torch.Tensor, requests: list[Request]) -> list[Sampled | SamplingError]:
        """logits [S, vocab] float32 on the CPU, one row per request -> (token id, logprobs or None), or
        the row's error."""
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
                if params.greedy:
                    token = greedy_tokens[i]
                else:
                    probs = reference_probs(row, params.temperature, params.top_k, params.top_p)
                    generator = req.generator_on(logits.device) or self._generator
                    token = int(torch.multinomial(probs, 1, generator=generator))
            except RuntimeError as exc:  # torch refused this row's distribution: this request fails alone
                out.append(SamplingError(f"sampling request {req.request_id!r} failed: {exc}"))
                continue
            out.append((token, None if params.logprobs is None else reference_logprobs(row, token, params.logprobs)))
        return out


def reference_probs(row: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """One row's sampling distribution [vocab] (sums to 1) after temperature, top-k and top-p."""
    row = row / temperature
    if top_k and top_k < row.numel():
        kth = torch.topk(row, top_k).values[-1]
        row = row.masked_fill(row < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(row, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop tokens once the mass before them reaches top_p; the top token always stays, also when top_p
        # rounds to 0 in float32
        drop = (probs.cumsum(-1) - probs) >= top_p
        drop[0] = False
        row = row.scatter(0, order[drop], float("-inf"))
    return row.softmax(-1)


def reference_logprobs(row: torch.Tensor, token: int, top: int) -> dict[int, float]:
    """The sampled token's log-probability under the raw model distribution, plus the `top` most likely."""
    lp = torch.log_softmax(row, dim=-1)
    result = {token: float(lp[token])}
    if top:
        values, ids = torch.topk(lp, top)
        for v, t in zip(values.tolist(), ids.tolist(), strict=True):
            result.setdefault(t, v)
    return result

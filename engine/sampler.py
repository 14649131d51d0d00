"""Next-token sampling for a whole batch on the logits' device: greedy, temperature, top-k, top-p,
per-request seeds, logprobs.

Invariants:
- Rows are independent: a request's token depends only on its logits row, its SamplingParams and (seeded
  requests) its own generator, never on what else is in the batch.
- A row that cannot be sampled (a NaN or +inf logit, from a model gone numerically wrong, or no finite
  logit at all) gives a SamplingError for that request alone. In-range extremes never raise: a
  temperature just above GREEDY_BELOW, top_p that rounds to 0 (the top token stays), top_k 1 or past
  the vocabulary, logits near the float32 limit.
- Greedy rows take argmax of the raw logits (the first index on ties).
- A sampled row's token is argmax(p / q) with p its filtered probabilities and q ~ Exp(1) drawn per
  vocabulary entry (the exponential race): the smallest of independent Exp(p_i) variables falls on
  entry i with probability p_i, so this is a categorical draw from p without a cumulative sum.
- Cuts are logit values: top-k keeps every token at least as likely as the k-th, top-p every token at
  least as likely as the last one needed to reach the mass top_p (the mass before a kept token is
  below top_p; the top token always stays). Ties at the cut stay, so the result does not depend on how
  a sort orders equal logits.
- Logprobs (log-probabilities, natural log) are those of the raw model distribution, before
  temperature and cuts: the sampled token's plus the top `logprobs` alternatives.

Cost per call: the host builds the per-row parameters once and sends them in one host->device copy;
the device runs a few batched ops (one sort, over the rows that have top-k or top-p); the results come
back in one device->host copy. q is drawn as -log(U), U uniform in float64: on the CPU torch's
exponential_ is several times slower than rand + log, and 53-bit U makes exact ties between two
tokens' q negligible (float32 U would tie the winner about once in 300 draws over 49152 equally likely
tokens, always in favour of the lower id). Unseeded rows draw U from the sampler's own generator in
one op; each seeded sampled row draws its own U row from its request's generator, one small op per
such row, so its stream advances by exactly one vocabulary-sized float64 draw per token whatever the
batch. That makes a seeded stream resumable from the seed alone: replay_draws(generator, k, vocab) puts a
fresh generator where it would be after k sampled tokens (a request resumed on another engine).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from engine.request import Request

Sampled = tuple[int, dict[int, float] | None]

_NEG_INF = float("-inf")
_F32_MAX = torch.finfo(torch.float32).max


class SamplingError(RuntimeError):
    """One request's row could not be sampled; the other rows are unaffected."""


class Sampler:
    def __init__(self, seed: int) -> None:
        self._seed = seed
        # for requests without a seed, one per device the logits come from (a generator lives on one device)
        self._generators: dict[torch.device, torch.Generator] = {}

    def __call__(self, logits: torch.Tensor, requests: list[Request]) -> list[Sampled | SamplingError]:
        """logits [S, vocab] float, row i for requests[i] -> (token id, logprobs or None), or the row's error."""
        if logits.shape[0] != len(requests):
            raise ValueError(f"{logits.shape[0]} logits rows for {len(requests)} requests")
        if not requests:
            return []
        logits = logits.float()
        device, vocab = logits.device, logits.shape[1]
        plan = _Plan.build(requests, vocab)
        errors: dict[int, SamplingError] = {}
        seeded: list[tuple[int, torch.Generator]] = []  # (position among the sampled rows, its generator)
        # meta tensors have no values to draw: the shapes run through, the request's generator is not made,
        # and the device -> host copy at the end is where the call fails (NotImplementedError)
        for pos, row in enumerate(plan.sample_rows if device.type != "meta" else ()):
            req = requests[row]
            try:
                generator = req.generator_on(device)
                if generator is not None and req.num_draws_to_replay:
                    replay_draws(generator, req.num_draws_to_replay, vocab)
                    req.num_draws_to_replay = 0
            except (RuntimeError, ValueError) as exc:  # a bad carried-over state: this request fails alone
                errors[row] = SamplingError(f"sampling request {req.request_id!r} failed: {exc}")
                continue
            if generator is not None:
                seeded.append((pos, generator))

        params = _upload(plan, device)
        row_max = logits.amax(dim=-1)  # NaN if any logit is NaN, +inf if any is +inf, -inf if none is finite
        everyone = len(plan.sample_rows) == len(requests)
        tokens = None if everyone else logits.argmax(dim=-1)  # the greedy rows' tokens
        if plan.sample_rows:
            rows = logits if everyone else logits.index_select(0, params.sample_rows)
            maxes = row_max if everyone else row_max.index_select(0, params.sample_rows)
            scores = sample_scores(rows, maxes, params.temperature, params.top_k, params.top_p, params.cut_rows)
            drawn = race(scores, self._noise(scores, seeded, len(seeded) < len(plan.sample_rows)))
            tokens = drawn if tokens is None else tokens.index_copy(0, params.sample_rows, drawn)

        pieces = [tokens, row_max]
        if plan.logprob_rows:
            logprobs = torch.log_softmax(logits.index_select(0, params.logprob_rows), dim=-1)
            pieces.append(logprobs.gather(1, tokens.index_select(0, params.logprob_rows)[:, None]).flatten())
            if plan.top_n:
                values, ids = torch.topk(logprobs, plan.top_n, dim=-1)
                pieces += [values.flatten(), ids.flatten()]
        # the one device -> host copy; float64 holds every float32 value and every token id exactly
        host = torch.cat([p.double() for p in pieces]).tolist()
        return plan.results(requests, host, errors)

    def _noise(self, scores: torch.Tensor, seeded: list[tuple[int, torch.Generator]],
               any_unseeded: bool) -> torch.Tensor:
        """q ~ Exp(1) float32, shaped like scores: the sampler's generator for unseeded rows, each seeded
        row's own. q = -log(U) > 0 (U < 1); U = 0 gives q = +inf, a token that cannot win."""
        u = torch.empty(scores.shape, dtype=torch.float64, device=scores.device)
        if any_unseeded:
            u.uniform_(generator=self._generator(scores.device))
        for pos, generator in seeded:
            u[pos] = noise_row(generator, scores.shape[1])
        return u.log_().neg_().float()

    def _generator(self, device: torch.device) -> torch.Generator | None:
        if device.type == "meta":  # torch makes no generator for meta, whose draws have no values anyway
            return None
        generator = self._generators.get(device)
        if generator is None:
            generator = self._generators[device] = torch.Generator(device=device).manual_seed(self._seed)
        return generator


def noise_row(generator: torch.Generator, vocab: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """One seeded row's uniform draws U [vocab] float64 on the generator's device: a fresh row (out, when
    given, is overwritten), not a view into the batch's noise, so its values depend only on the generator's
    state. Every seeded sampled token takes exactly one such row."""
    return torch.rand(vocab, dtype=torch.float64, device=generator.device, generator=generator, out=out)


def replay_draws(generator: torch.Generator, num_tokens: int, vocab: int) -> None:
    """Advance generator by the draws num_tokens seeded sampled tokens made over a vocab-wide logits row
    (one noise_row each), so the next token drawn equals the one an uninterrupted run would draw next.
    Costs num_tokens x vocab float64 draws on the generator's device, thrown away: measured on one core of a
    busy 2-core CPU box, 0.1 s for 1,000 tokens of an 8,192 vocabulary, 2.2 s for 1,500 of 49,152 (74 M
    draws), paid once, in the resumed request's first sampling step."""
    if num_tokens <= 0:
        return
    scratch = torch.empty(vocab, dtype=torch.float64, device=generator.device)
    for _ in range(num_tokens):
        noise_row(generator, vocab, scratch)


def sample_scores(logits: torch.Tensor, row_max: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                  top_p: torch.Tensor, cut_rows: torch.Tensor | None) -> torch.Tensor:
    """The rows to sample, [n, vocab] logits with their maxima [n] -> scores [n, vocab]: (logits - max) /
    temperature, -inf outside the top-k/top-p cut. exp(scores) is the sampling distribution up to a
    per-row factor (the top token scores 0, so exp never overflows).

    temperature [n] (> 0, finite); cut_rows [m] the rows with top-k or top-p, None when none has;
    top_k [m] (the vocabulary size where top-k is off) and top_p [m] (+inf where top-p is off) for
    those rows. Pure tensor code on the logits' device, no host sync: it runs on `meta` tensors too.
    Raises ValueError if a tensor is on another device.
    """
    _same_device(logits, row_max, temperature, top_k, top_p, cut_rows)
    # subtracting the max first: dividing a large logit by a temperature near GREEDY_BELOW cannot overflow
    scores = (logits - row_max[:, None]).div_(temperature[:, None])
    if cut_rows is not None:
        cut = torch.full_like(row_max, _NEG_INF).index_copy_(0, cut_rows,
                                                             _cut_values(scores.index_select(0, cut_rows),
                                                                         top_k, top_p))
        scores.masked_fill_(scores < cut[:, None], _NEG_INF)
    return scores


def race(scores: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Token ids [n]: argmax over the vocabulary of exp(scores) / q, q ~ Exp(1) (positive) per entry."""
    _same_device(scores, q)
    return scores.exp().div_(q).argmax(dim=-1)


def _cut_values(scores: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """[m, vocab] scores -> [m]: the smallest score kept by top-k, then top-p over what top-k kept."""
    vocab = scores.shape[1]
    ordered = _sorted_descending(scores)
    kth = ordered.gather(1, (top_k.long() - 1).clamp_(0, vocab - 1)[:, None])
    kept_k = (ordered >= kth).sum(dim=-1)  # k, or more where tokens tie with the k-th
    probs = ordered.masked_fill_(ordered < kth, _NEG_INF).softmax(dim=-1)  # top-p renormalises after top-k
    # token j + 1 stays while the mass of tokens 0..j is below top_p; a float cumsum of non-negative terms
    # never decreases, so this count is the length of the kept prefix (at least 1: the top token)
    kept_p = 1 + (probs.cumsum(dim=-1)[:, :-1] < top_p[:, None]).sum(dim=-1)
    # clamp: a broken (NaN) row can count 0 kept; it fails on the host, but must not fail the gather
    kept = torch.minimum(kept_k, kept_p).clamp_(1, vocab)
    # positions below kept_k were not masked above, so this reads the kept token's own score
    return ordered.gather(1, (kept - 1)[:, None]).squeeze(1)


def _sorted_descending(scores: torch.Tensor) -> torch.Tensor:
    """Each row's values, largest first (NaN anywhere: only broken rows have them, and they fail)."""
    if scores.device.type == "cpu":
        # numpy's SIMD sort is an order of magnitude faster than torch's CPU sort on rows of 50k floats
        # (0.2 ms against 2-4 ms a row on a 2-core x86 box); only the values are needed, not the order
        return torch.from_numpy(np.sort(scores.neg().numpy(), axis=-1)).neg_()
    return torch.sort(scores, dim=-1, descending=True).values


def _same_device(*tensors: torch.Tensor | None) -> None:
    device = tensors[0].device
    for t in tensors[1:]:
        if t is not None and t.device != device:
            raise ValueError(f"sampling tensors must share the logits' device {device}, got one on {t.device}")


@dataclass
class _Params:
    """One call's per-row parameters and row indices on the device, cut from one uploaded tensor."""

    temperature: torch.Tensor  # [n] float32, the sampled rows
    top_k: torch.Tensor  # [m] float32, the cut rows
    top_p: torch.Tensor  # [m] float32
    sample_rows: torch.Tensor  # [n] int64 rows of the batch sampled (not greedy)
    cut_rows: torch.Tensor | None  # [m] int64 positions among the sampled rows with top-k or top-p
    logprob_rows: torch.Tensor  # [l] int64 rows of the batch that want logprobs


@dataclass
class _Plan:
    """What the host knows before any tensor op: which rows sample, cut, want logprobs, and their values."""

    sample_rows: list[int] = field(default_factory=list)
    temperature: list[float] = field(default_factory=list)
    cut_rows: list[int] = field(default_factory=list)
    top_k: list[float] = field(default_factory=list)
    top_p: list[float] = field(default_factory=list)
    logprob_rows: list[int] = field(default_factory=list)
    top_n: int = 0

    @classmethod
    def build(cls, requests: list[Request], vocab: int) -> _Plan:
        plan = cls()
        for row, req in enumerate(requests):
            params = req.sampling_params
            if params.logprobs is not None:
                plan.logprob_rows.append(row)
                plan.top_n = max(plan.top_n, min(params.logprobs, vocab))
            if params.greedy:
                continue
            k = params.top_k if 0 < params.top_k < vocab else vocab
            if k < vocab or params.top_p < 1.0:
                plan.cut_rows.append(len(plan.sample_rows))
                plan.top_k.append(k)
                plan.top_p.append(params.top_p if params.top_p < 1.0 else math.inf)
            plan.sample_rows.append(row)
            # a temperature past float32's range would make (logit - max) / t NaN where the logit is -inf
            plan.temperature.append(min(params.temperature, _F32_MAX))
        return plan

    def results(self, requests: list[Request], host: list[float],
                errors: dict[int, SamplingError]) -> list[Sampled | SamplingError]:
        """Per-row answers from the flat host copy: tokens [S], row maxima [S], then the logprob rows'
        sampled-token logprob [l], top values [l, top_n] and top ids [l, top_n]."""
        size = len(requests)
        tokens, maxima = host[:size], host[size:2 * size]
        n_lp = len(self.logprob_rows)
        sampled_lp = host[2 * size:2 * size + n_lp]
        values_at = 2 * size + n_lp
        ids_at = values_at + n_lp * self.top_n
        lp_index = {row: i for i, row in enumerate(self.logprob_rows)}
        out: list[Sampled | SamplingError] = []
        for row, req in enumerate(requests):
            if row in errors:
                out.append(errors[row])
            elif not math.isfinite(maxima[row]):
                out.append(SamplingError(f"the model's logits for request {req.request_id!r} are not finite"))
            else:
                token = int(tokens[row])
                logprobs = None
                if row in lp_index:
                    i, top = lp_index[row], min(req.sampling_params.logprobs or 0, self.top_n)
                    logprobs = {token: sampled_lp[i]}
                    start = i * self.top_n
                    for v, t in zip(host[values_at + start:values_at + start + top],
                                    host[ids_at + start:ids_at + start + top], strict=True):
                        logprobs.setdefault(int(t), v)
                out.append((token, logprobs))
        return out


def _upload(plan: _Plan, device: torch.device) -> _Params:
    """The plan's numbers as device tensors through one host->device copy (float64: exact for every
    index and top_k; temperature and top_p are then used in float32, as the logits are)."""
    parts = [plan.temperature, plan.top_k, plan.top_p, plan.sample_rows, plan.cut_rows, plan.logprob_rows]
    host = torch.tensor([x for part in parts for x in part], dtype=torch.float64)
    if device.type == "cuda":
        host = host.pin_memory()  # pinned: the copy is asynchronous, no wait for the forward pass here
    flat = host.to(device, non_blocking=True)
    views = flat.split([len(part) for part in parts])
    temperature, top_k, top_p = (v.float() for v in views[:3])
    sample_rows, cut_rows, logprob_rows = (v.long() for v in views[3:])
    return _Params(temperature, top_k, top_p, sample_rows, cut_rows if plan.cut_rows else None, logprob_rows)

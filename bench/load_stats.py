"""What one load run measured: per-request records in, per-product latency percentiles, throughput and goodput out.

Definitions (the ones vLLM's serving benchmark uses, so numbers compare):
- time to first token (TTFT): request sent -> first chunk carrying output text, seconds;
- inter-token latency (ITL): gaps between successive content chunks, pooled over requests, seconds;
- time per output token (TPOT): (e2e - TTFT) / (output tokens - 1), one number per request, seconds;
- end-to-end latency (e2e): request sent -> stream finished, seconds;
- throughput: output tokens and finished requests per second of the run's wall time (first send to
  last answer), the same denominator for every product so products add up;
- goodput: requests per second that finished and met their product's SLO: TTFT <= slo.ttft_s and
  TPOT <= slo.itl_s. A request's mean gap stands for its ITL here: one slow chunk (a long prefill
  batched in) should show in the ITL tail, not fail a 1,500-token report on its own.
Percentiles interpolate linearly between samples (numpy's default).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from cluster.products import SLO

OK = "ok"
RATE_LIMITED = "429"
CANCELLED = "cancelled"  # still running when the run's drain time ran out
CLIENT_ERROR = "client_error"  # the load client itself failed on this request (a bug: see its error text)
QUANTILES = (50.0, 90.0, 99.0)
ALL = "all"


@dataclass(frozen=True)
class RequestRecord:
    """One request's outcome; times in seconds (sent_s from the run's start, the rest from sent_s)."""

    request_id: str
    product: str
    sent_s: float
    outcome: str  # OK, an HTTP status code ("429", "503", ...), "timeout", "connection", "stream_error", CANCELLED
    ttft_s: float | None = None
    e2e_s: float | None = None
    itl_s: tuple[float, ...] = ()  # gaps between content chunks
    output_tokens: int = 0  # from the stream's usage when sent, else the number of content chunks
    prompt_tokens: int | None = None  # from usage, when sent
    cached_tokens: int | None = None  # usage.prompt_tokens_details.cached_tokens, when sent
    retry_after_s: float | None = None  # a 429's Retry-After header (recorded, not obeyed: see load_dispatch)
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.outcome == OK

    @property
    def tpot_s(self) -> float | None:
        """Mean time per output token after the first, seconds; None with fewer than two tokens."""
        if not self.ok or self.output_tokens < 2 or self.ttft_s is None or self.e2e_s is None:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)


@dataclass(frozen=True)
class Percentiles:
    """P50/P90/P99 and mean of one latency, seconds; all None when there were no samples."""

    count: int
    mean: float | None = None
    p50: float | None = None
    p90: float | None = None
    p99: float | None = None


@dataclass(frozen=True)
class ProductSummary:
    """One product's (or ALL products') results over a run."""

    product: str
    sent: int
    ok: int
    errors: Mapping[str, int]  # outcome -> count, every outcome but OK (429s included, under "429")
    rate_limited: int  # 429s: also counted in errors
    ttft: Percentiles
    itl: Percentiles
    tpot: Percentiles
    e2e: Percentiles
    output_tokens: int
    output_tok_per_s: float
    req_per_s: float
    goodput_req_per_s: float  # for ALL too: each request is judged by its own product's SLO
    slo_met: int
    slo: SLO | None  # None for ALL


@dataclass(frozen=True)
class RunSummary:
    wall_s: float
    products: Mapping[str, ProductSummary] = field(default_factory=dict)  # every product, plus ALL


def percentiles(values: Sequence[float]) -> Percentiles:
    """Linear-interpolation P50/P90/P99 and the mean of `values` (seconds)."""
    if not values:
        return Percentiles(count=0)
    p50, p90, p99 = (float(v) for v in np.percentile(np.asarray(values, dtype=float), QUANTILES))
    return Percentiles(count=len(values), mean=float(np.mean(values)), p50=p50, p90=p90, p99=p99)


def meets_slo(record: RequestRecord, slo: SLO) -> bool:
    """Finished, TTFT <= slo.ttft_s and mean time per output token <= slo.itl_s (one-token outputs: TTFT only)."""
    if not record.ok or record.ttft_s is None or record.ttft_s > slo.ttft_s:
        return False
    tpot = record.tpot_s
    return tpot is None or tpot <= slo.itl_s


def summarize(records: Iterable[RequestRecord], slos: Mapping[str, SLO], wall_s: float) -> RunSummary:
    """Per product (every product in `slos` or in the records) and over ALL; rates per second of `wall_s`."""
    if wall_s <= 0:
        raise ValueError(f"wall_s must be > 0, got {wall_s}")
    records = list(records)
    names = sorted(set(slos) | {r.product for r in records})
    out = {name: _summarize_one(name, [r for r in records if r.product == name], slos, wall_s) for name in names}
    out[ALL] = _summarize_one(ALL, records, slos, wall_s)
    return RunSummary(wall_s=wall_s, products=out)


def _summarize_one(name: str, records: list[RequestRecord], slos: Mapping[str, SLO], wall_s: float) -> ProductSummary:
    done = [r for r in records if r.ok]
    errors = Counter(r.outcome for r in records if not r.ok)
    met = sum(meets_slo(r, slos[r.product]) for r in done if r.product in slos)
    tokens = sum(r.output_tokens for r in done)
    return ProductSummary(
        product=name, sent=len(records), ok=len(done), errors=dict(sorted(errors.items())),
        rate_limited=errors.get(RATE_LIMITED, 0),
        ttft=percentiles([r.ttft_s for r in done if r.ttft_s is not None]),
        itl=percentiles([gap for r in done for gap in r.itl_s]),
        tpot=percentiles([t for r in done if (t := r.tpot_s) is not None]),
        e2e=percentiles([r.e2e_s for r in done if r.e2e_s is not None]),
        output_tokens=tokens, output_tok_per_s=tokens / wall_s, req_per_s=len(done) / wall_s,
        goodput_req_per_s=met / wall_s, slo_met=met, slo=slos.get(name),
    )

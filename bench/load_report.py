"""Write a load run's results: results.json (summary + run settings), requests.jsonl (one record per
request, to recompute anything later), results.md (a table per product) and latency_cdf.png (TTFT,
ITL and end-to-end latency CDFs per product)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from bench.load_stats import ALL, Percentiles, ProductSummary, RequestRecord, RunSummary

RESULTS_JSON, REQUESTS_JSONL, RESULTS_MD, CDF_PNG = "results.json", "requests.jsonl", "results.md", "latency_cdf.png"


def write_report(summary: RunSummary, records: Sequence[RequestRecord], settings: Mapping[str, Any],
                 out_dir: str | Path) -> dict[str, Path]:
    """Write the four files into out_dir (created); returns them by name."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {name: out / name for name in (RESULTS_JSON, REQUESTS_JSONL, RESULTS_MD, CDF_PNG)}
    doc = {"settings": dict(settings), "wall_s": summary.wall_s,
           "products": {name: dataclasses.asdict(p) for name, p in summary.products.items()}}
    paths[RESULTS_JSON].write_text(json.dumps(doc, indent=2, default=_plain) + "\n")
    paths[REQUESTS_JSONL].write_text("".join(json.dumps(dataclasses.asdict(r)) + "\n" for r in records))
    paths[RESULTS_MD].write_text(markdown(summary, settings))
    plot_cdfs(records, paths[CDF_PNG])
    return paths


def _plain(obj: Any) -> Any:
    if isinstance(obj, BaseModel):
        return obj.model_dump()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def markdown(summary: RunSummary, settings: Mapping[str, Any]) -> str:
    """Two tables, latency and throughput, a row per product; latencies in ms, rates per second."""
    rows = [summary.products[n] for n in sorted(summary.products, key=lambda n: (n == ALL, n))]
    lines = [f"Run: {summary.wall_s:.1f} s wall; " + ", ".join(f"{k}={v}" for k, v in settings.items()), "",
             "| product | TTFT P50 / P90 / P99 (ms) | ITL P50 / P90 / P99 (ms) | TPOT P50 / P99 (ms) "
             "| e2e P50 / P90 / P99 (s) |",
             "|---|---|---|---|---|"]
    lines += [f"| {p.product} | {_ms(p.ttft)} | {_ms(p.itl)} | {_ms(p.tpot, ('p50', 'p99'))} | {_s(p.e2e)} |"
              for p in rows]
    lines += ["", "| product | sent | ok | errors | 429 | output tok/s | req/s | goodput req/s | SLO met | "
              "SLO (TTFT s, ITL s) |", "|---|---|---|---|---|---|---|---|---|---|"]
    lines += [_rate_row(p) for p in rows]
    return "\n".join(lines) + "\n"


def _rate_row(p: ProductSummary) -> str:
    errors = ", ".join(f"{k}: {v}" for k, v in p.errors.items()) or "0"
    slo = f"{p.slo.ttft_s:g}, {p.slo.itl_s:g}" if p.slo is not None else "each product's"
    met = f"{p.slo_met}/{p.ok}" if p.ok else "0"
    return (f"| {p.product} | {p.sent} | {p.ok} | {errors} | {p.rate_limited} | {p.output_tok_per_s:.1f} "
            f"| {p.req_per_s:.2f} | {p.goodput_req_per_s:.2f} | {met} | {slo} |")


def _ms(p: Percentiles, fields: tuple[str, ...] = ("p50", "p90", "p99")) -> str:
    values = [getattr(p, f) for f in fields]
    return "-" if values[0] is None else " / ".join(f"{v * 1e3:.0f}" for v in values)


def _s(p: Percentiles) -> str:
    return "-" if p.p50 is None else " / ".join(f"{v:.2f}" for v in (p.p50, p.p90, p.p99))


def plot_cdfs(records: Sequence[RequestRecord], path: Path) -> None:
    """Empirical CDFs of TTFT, ITL (every gap) and e2e latency per product, log-scaled seconds."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a benchmark machine
    import matplotlib.pyplot as plt

    done = [r for r in records if r.ok]
    metrics = {"time to first token": lambda r: [r.ttft_s], "inter-token latency": lambda r: list(r.itl_s),
               "end-to-end latency": lambda r: [r.e2e_s]}
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 4), constrained_layout=True)
    for ax, (title, values_of) in zip(axes, metrics.items(), strict=True):
        for product in sorted({r.product for r in done}):
            values = sorted(v for r in done if r.product == product for v in values_of(r) if v and v > 0)
            if values:
                ax.step(values, [(i + 1) / len(values) for i in range(len(values))], where="post", label=product)
        ax.set_xscale("log")
        ax.set(title=title, xlabel="seconds (log)", ylabel="fraction of samples", ylim=(0, 1.02))
        ax.grid(True, which="both", alpha=0.3)
        if ax.has_data():
            ax.legend(loc="lower right")
    fig.savefig(path, dpi=100)
    plt.close(fig)

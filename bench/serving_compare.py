"""Side by side on one machine: the same load against two pdserve configurations, one after the other.

    python -m bench.serving_compare prefix    --rate 1 --duration 120 --scale 0.25 --out results/prefix
    python -m bench.serving_compare placement --rate 1 --duration 120 --scale 0.25 --out results/placement
    python -m bench.serving_compare placement --quick --out /tmp/placement    # a few minutes: a smoke run

`prefix`: prefix caching on (each engine's block-hash cache plus the cluster directory, system prompts
pinned at start) vs off (`engine.enable_prefix_caching: false`, no directory). Reported: prompt tokens
computed vs taken from a cache (from the cluster's /metrics, during the load only), TTFT per product.
`placement`: disaggregated (a prefill and a decode deployment per product) vs colocated
(`disaggregated: false`: the decode engine prefills too, so prompt chunks share its steps with the
running decodes). Reported: TTFT and inter-token latency P50/P99 per product, throughput, goodput.

Each variant is the repository's product files (--products-dir) with one override merged in, deployed
with `pdserve up --detach` on a fresh local Ray, driven by `pdserve bench`'s client with the same seed
(so the same requests, in the same order), then stopped with `pdserve down`. Targets 127.0.0.1 only;
bounded by --duration, --requests and --drain.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import json
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from bench.load_bench import BenchPlan, add_arguments, plan_from_args, run_plan
from bench.load_client import ChatSender, Endpoint, require_local
from bench.load_report import write_report
from bench.load_stats import ALL, ProductSummary, RunSummary, summarize
from bench.offline_throughput import model_path
from cluster.metric_names import PREFIX

_ONE_REPLICA = {"autoscaling": {"min_replicas": 1, "max_replicas": 1}}
# Both products on one pool with 2 x 128 MiB of KV: two colocated engines, or a prefill engine on core 0 with
# a quarter of it and a decode engine on core 1 with the rest (what each role holds).
_COLOCATED_POOL = {"pool": "shared", "disaggregated": False, "prefill": _ONE_REPLICA,
                   "decode": {"autoscaling": {"min_replicas": 2, "max_replicas": 2}}}
_DISAGGREGATED_POOL = {
    "pool": "shared", "prefill": {**_ONE_REPLICA, "cpu_affinity": [0], "engine": {"kv_cache_bytes": 64 << 20}},
    "decode": {**_ONE_REPLICA, "cpu_affinity": [1], "engine": {"kv_cache_bytes": 192 << 20}}}
# Variants per comparison: (label, override merged into every product file; its "per_product" list, if
# any, is merged into the product files in name order, one each). The first variant is the baseline.
COMPARISONS: dict[str, tuple[tuple[str, dict[str, Any]], ...]] = {
    "prefix": (("prefix cache off", {"engine": {"enable_prefix_caching": False}}), ("prefix cache on", {})),
    # Every process may run on every core: on a 2-core box prefill and decode still share the cores.
    "placement": (("colocated", {"disaggregated": False}), ("disaggregated", {})),
    # The same two cores split the way each placement would use separate devices: colocated gives each
    # product's engine a core; disaggregated gives the prefill engines one core and the decode engines
    # the other. One replica per role, so the split is exactly this.
    "placement-pinned": (
        ("colocated, a core per product", {
            "disaggregated": False, "decode": _ONE_REPLICA,
            "per_product": [{"decode": {"cpu_affinity": [0]}}, {"decode": {"cpu_affinity": [1]}}]}),
        ("disaggregated, prefill core 0, decode core 1", {
            "prefill": {**_ONE_REPLICA, "cpu_affinity": [0]}, "decode": {**_ONE_REPLICA, "cpu_affinity": [1]}}),
    ),
    # As above, but the disaggregated split gives the long-output product's decode a core of its own:
    # report-gen decode on core 1; both prefills and support-chat's decode on core 0. (Product files in
    # name order: report-gen, support-chat.)
    "placement-report-core": (
        ("colocated, a core per product", {
            "disaggregated": False, "decode": _ONE_REPLICA,
            "per_product": [{"decode": {"cpu_affinity": [1]}}, {"decode": {"cpu_affinity": [0]}}]}),
        ("disaggregated, report-gen decode alone on core 1", {
            "prefill": {**_ONE_REPLICA, "cpu_affinity": [0]}, "decode": _ONE_REPLICA,
            "per_product": [{"decode": {"cpu_affinity": [1]}}, {"decode": {"cpu_affinity": [0]}}]}),
    ),
    # Both products on one engine pool (`pool: shared`), as one GPU pool serves several products. Colocated:
    # two engines, each prefilling and decoding requests of both products. Disaggregated: a prefill engine
    # on core 0 and a decode engine on core 1.
    "pool": (
        ("colocated pool, two engines", {
            "pool": "shared", "disaggregated": False, "prefill": _ONE_REPLICA,
            "decode": {"autoscaling": {"min_replicas": 2, "max_replicas": 2}}}),
        ("disaggregated pool, prefill core 0, decode core 1", {
            "pool": "shared", "prefill": {**_ONE_REPLICA, "cpu_affinity": [0]},
            "decode": {**_ONE_REPLICA, "cpu_affinity": [1]}}),
    ),
    # As "pool", with the same KV memory in both placements (2 x 128 MiB) split by what each role holds:
    # the decode engine keeps every running sequence to its end, the prefill engine prompts until exported.
    "pool-sized": (
        ("colocated pool, two engines", _COLOCATED_POOL),
        ("disaggregated pool, prefill core 0 (64 MiB KV), decode core 1 (192 MiB)", _DISAGGREGATED_POOL),
    ),
    # The engines' scheduling policy on those pools: first come first served, or by each product's SLO
    # (prompts by TTFT deadline, prompt chunks sized to keep decodes within their ITL target; the shipped
    # products' policy, so both are named here).
    "scheduling": (
        ("disaggregated pool, FCFS", {**_DISAGGREGATED_POOL, "engine": {"scheduling": "fcfs"}}),
        ("disaggregated pool, SLO scheduling", {**_DISAGGREGATED_POOL, "engine": {"scheduling": "slo"}}),
    ),
    "scheduling-colocated": (
        ("colocated pool, FCFS", {**_COLOCATED_POOL, "engine": {"scheduling": "fcfs"}}),
        ("colocated pool, SLO scheduling", {**_COLOCATED_POOL, "engine": {"scheduling": "slo"}}),
    ),
}
COUNTERS = ("prompt_tokens_computed", "prompt_tokens_cached", "generation_tokens")


@dataclass(frozen=True)
class VariantResult:
    label: str
    summary: RunSummary
    counters: Mapping[str, Mapping[str, float]]  # counter -> product -> increase during the load
    warm_counters: Mapping[str, Mapping[str, float]]  # the same, from start to before the load (warm-up)


def merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """`base` with `override` merged in: nested mappings merge, anything else replaces."""
    out = dict(base)
    for key, value in override.items():
        out[key] = merge(out[key], value) if isinstance(value, Mapping) and isinstance(out.get(key), Mapping) \
            else value
    return out


def write_variant(products_dir: Path, override: Mapping[str, Any], into: Path, model: str | None = None,
                  kv_scale: float = 1.0) -> Path:
    """Copy every product file of products_dir into `into` with `override` merged in (and `model`, a
    folder, replacing theirs when given; every engine's KV memory times `kv_scale`, after the override,
    so a split by role keeps its proportions); returns a Serve config deploying them."""
    products = into / "products"
    products.mkdir(parents=True)
    common = {k: v for k, v in override.items() if k != "per_product"}
    per_product = override.get("per_product") or [{}]
    for i, path in enumerate(sorted(products_dir.glob("*.yaml"))):
        # a deep copy: merge shares the override's own nested dicts, which _scale_kv changes in place
        data = copy.deepcopy(merge(merge(yaml.safe_load(path.read_text()), common), per_product[i % len(per_product)]))
        if model is not None:
            data["model"] = model
        if kv_scale != 1.0:
            _scale_kv(data, kv_scale)
        (products / path.name).write_text(yaml.safe_dump(data))
    config = into / "serve.yaml"
    config.write_text(yaml.safe_dump({
        "http_options": {"host": "127.0.0.1", "port": 8000},
        "applications": [{"name": "pdserve", "route_prefix": "/", "import_path": "cluster.app:app_builder",
                          "args": {"products_dir": str(products)}}],
    }))
    return config


def _scale_kv(product: dict[str, Any], factor: float) -> None:
    """Multiply the product's engine KV bytes, and any role's own, by factor (in place)."""
    for engine in [product.get("engine"), *(product.get(role, {}).get("engine") for role in ("prefill", "decode"))]:
        if engine and "kv_cache_bytes" in engine:
            engine["kv_cache_bytes"] = int(engine["kv_cache_bytes"] * factor)


def scrape_counters(metrics_url: str) -> dict[str, dict[str, float]]:
    """parse_counters of a Prometheus text endpoint."""
    with urllib.request.urlopen(metrics_url, timeout=30) as response:
        return parse_counters(response.read().decode())


def parse_counters(text: str) -> dict[str, dict[str, float]]:
    """COUNTERS in Prometheus text: counter -> product -> value (summed over other labels)."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, dict[str, float]] = {name: {} for name in COUNTERS}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            bare = sample.name.removeprefix(PREFIX).removesuffix("_total")
            if bare in out and sample.name.endswith("_total"):
                product = sample.labels.get("product", ALL)
                out[bare][product] = out[bare].get(product, 0.0) + sample.value
    return out


def _delta(after: Mapping[str, Mapping[str, float]], before: Mapping[str, Mapping[str, float]]
           ) -> dict[str, dict[str, float]]:
    return {name: {p: v - before.get(name, {}).get(p, 0.0) for p, v in per.items()} for name, per in after.items()}


def _pdserve(*argv: str) -> None:
    subprocess.run([sys.executable, "-m", "cluster.cli", *argv], check=True)


@contextlib.contextmanager
def deployed(label: str, config: Path, port: int, num_cpus: int, direct_ingress: bool = False) -> Iterator[str]:
    """`config` deployed detached on a fresh local Ray for the block's duration (stopped always); yields
    its base URL. direct_ingress: the ingress replica answers HTTP itself, without Serve's proxy hop."""
    print(f"\n=== {label}: deploying", flush=True)
    _pdserve("up", "--detach", "--config", str(config), "--port", str(port), "--num-cpus", str(num_cpus),
             *(["--direct-ingress"] if direct_ingress else []))
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        _pdserve("down")


def load_run(args: argparse.Namespace, base: str, label: str, out: Path | None) -> tuple[RunSummary, BenchPlan]:
    """One run of the load `args` describe against the server at `base`; its summary (its report written to
    `out` when given) and plan."""
    plan = plan_from_args(args)
    endpoint = Endpoint(base_url=f"{base}/v1", models=plan.models, api_keys={}, default_api_key=args.api_key,
                        include_system=plan.include_system)
    print(f"=== {label}: load", flush=True)
    result = asyncio.run(run_plan(plan, ChatSender(endpoint), progress=not args.no_progress))
    summary = summarize(result.records, plan.slos, result.wall_s)
    if out is not None:
        write_report(summary, result.records, {"variant": label, **plan.settings()}, out)
    return summary, plan


def run_variant(label: str, config: Path, args: argparse.Namespace, out: Path) -> VariantResult:
    """Deploy `config`, run the load, scrape counters, stop it."""
    with deployed(label, config, args.port, args.num_cpus) as base:
        start = scrape_counters(f"{base}/metrics")
        summary, _ = load_run(args, base, label, out / _slug(label))
        time.sleep(2.0)  # counters reach the hub once a second
        end = scrape_counters(f"{base}/metrics")
    return VariantResult(label, summary, _delta(end, start), start)


def _slug(label: str) -> str:
    return label.replace(" ", "-")


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1000:.0f}"


def _ratio(a: float | None, b: float | None) -> str:
    return "-" if not a or not b else f"{a / b:.2f}x"


def latency_table(results: list[VariantResult]) -> str:
    """Per product and variant: TTFT and ITL P50/P99, output tok/s, goodput."""
    lines = ["| product | variant | ok / sent | TTFT P50 / P99 ms | ITL P50 / P99 ms | output tok/s "
             "| goodput req/s (met) |", "|---|---|---|---|---|---|---|"]
    for product in results[0].summary.products:
        for r in results:
            p: ProductSummary = r.summary.products[product]
            lines.append(f"| {product} | {r.label} | {p.ok} / {p.sent} | {_ms(p.ttft.p50)} / {_ms(p.ttft.p99)} | "
                         f"{_ms(p.itl.p50)} / {_ms(p.itl.p99)} | {p.output_tok_per_s:.1f} | "
                         f"{p.goodput_req_per_s:.2f} ({p.slo_met}/{p.sent}) |")
    return "\n".join(lines)


def ratio_table(results: list[VariantResult]) -> str:
    """Baseline / other for each latency (above 1: the second variant is faster) and other / baseline for rates."""
    base, other = results[0], results[1]
    lines = [f"| product ({base.label} / {other.label}; rates inverted) | TTFT P50 | TTFT P99 | ITL P50 | ITL P99 "
             "| output tok/s | goodput |", "|---|---|---|---|---|---|---|"]
    for product in base.summary.products:
        a, b = base.summary.products[product], other.summary.products[product]
        lines.append(f"| {product} | {_ratio(a.ttft.p50, b.ttft.p50)} | {_ratio(a.ttft.p99, b.ttft.p99)} | "
                     f"{_ratio(a.itl.p50, b.itl.p50)} | {_ratio(a.itl.p99, b.itl.p99)} | "
                     f"{_ratio(b.output_tok_per_s, a.output_tok_per_s)} | "
                     f"{_ratio(b.goodput_req_per_s, a.goodput_req_per_s)} |")
    return "\n".join(lines)


def token_table(results: list[VariantResult]) -> str:
    """Prompt tokens computed vs cached during the load (and at warm-up), per product."""
    lines = ["| product | variant | prompt tokens computed | cached | computed at warm-up |",
             "|---|---|---:|---:|---:|"]
    products = sorted({p for r in results for p in r.counters["prompt_tokens_computed"]})
    for product in products:
        for r in results:
            lines.append(f"| {product} | {r.label} | {r.counters['prompt_tokens_computed'].get(product, 0):,.0f} | "
                         f"{r.counters['prompt_tokens_cached'].get(product, 0):,.0f} | "
                         f"{r.warm_counters['prompt_tokens_computed'].get(product, 0):,.0f} |")
    return "\n".join(lines)


def report(comparison: str, results: list[VariantResult], command: str) -> str:
    parts = [f"# {comparison}: {' vs '.join(r.label for r in results)}", "", f"`{command}`", "",
             latency_table(results), "", ratio_table(results), "", token_table(results), ""]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("comparison", choices=sorted(COMPARISONS))
    add_arguments(parser)
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--num-cpus", type=int, default=8, help="logical CPUs of each local Ray")
    parser.add_argument("--serve-model", default=None,
                        help="serve this model in every product instead of theirs, as `model:` names it "
                             "(engine/models.py): tiny, small, smollm2-135m-instruct, a .gguf file or a folder")
    parser.add_argument("--kv-scale", type=float, default=1.0,
                        help="every engine's KV memory times this, in both variants (splits keep their proportions)")
    parser.set_defaults(out="bench-out/compare")
    args = parser.parse_args(argv)
    require_local(f"http://127.0.0.1:{args.port}/v1")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = model_path(args.serve_model) if args.serve_model else None
    args.tokenizer = args.tokenizer or args.serve_model  # prompts sized for the model that is served
    results = []
    with tempfile.TemporaryDirectory(prefix="pdserve-compare-") as tmp:
        for label, override in COMPARISONS[args.comparison]:
            config = write_variant(Path(args.products_dir), override, Path(tmp) / _slug(label), model,
                                   args.kv_scale)
            results.append(run_variant(label, config, args, out))
    command = "python -m bench.serving_compare " + " ".join(argv if argv is not None else sys.argv[1:])
    text = report(args.comparison, results, command)
    (out / "compare.md").write_text(text)
    (out / "compare.json").write_text(json.dumps(
        [{"label": r.label, "counters": r.counters, "warm_counters": r.warm_counters,
          "products": {k: asdict(v) for k, v in r.summary.products.items()}} for r in results], indent=2, default=str))
    print(text)
    return 0 if all(r.summary.products[ALL].ok for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())

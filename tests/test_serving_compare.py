"""bench/serving_compare.py: variants are the product files with one override merged in, counters parse
from the cluster's /metrics text, and the tables compare two runs. The runs themselves need a whole
cluster twice; BENCHMARKS.md has them (the cluster paths they use are tested in test_http_api and
test_disaggregated)."""

from __future__ import annotations

from pathlib import Path

import yaml

from bench.load_stats import OK, RequestRecord, summarize
from bench.serving_compare import COMPARISONS, VariantResult, merge, parse_counters, report, write_variant
from cluster.metric_names import PREFIX
from cluster.products import SLO, load_products

PRODUCTS = Path(__file__).resolve().parent.parent / "deploy" / "products"


def test_merge_nests_and_replaces() -> None:
    base = {"engine": {"block_size": 16, "num_threads": 1}, "disaggregated": True, "api_keys": ["a"]}
    out = merge(base, {"engine": {"enable_prefix_caching": False}, "disaggregated": False, "api_keys": []})
    assert out == {"engine": {"block_size": 16, "num_threads": 1, "enable_prefix_caching": False},
                   "disaggregated": False, "api_keys": []}
    assert base["engine"] == {"block_size": 16, "num_threads": 1}  # the input is not changed


def test_every_variant_is_a_valid_deployment(tmp_path: Path) -> None:
    for comparison, variants in COMPARISONS.items():
        for label, override in variants:
            config = write_variant(PRODUCTS, override, tmp_path / comparison / label.replace(" ", "-"))
            app = yaml.safe_load(config.read_text())["applications"][0]
            products = load_products(app["args"]["products_dir"])
            assert set(products) == set(load_products(PRODUCTS))
            for product in products.values():
                assert product.prefix_caching == (label != "prefix cache off")
                assert product.disaggregated == (not label.startswith("colocated"))


def test_pinned_placements_split_the_cores_as_labelled(tmp_path: Path) -> None:
    (colocated, colocated_override), (disaggregated, disaggregated_override) = COMPARISONS["placement-pinned"]
    one = load_products(write_variant(PRODUCTS, colocated_override, tmp_path / "c").parent / "products")
    assert sorted(p.decode.cpu_affinity for p in one.values()) == [(0,), (1,)]  # a core per product
    two = load_products(write_variant(PRODUCTS, disaggregated_override, tmp_path / "d").parent / "products")
    assert {(p.prefill.cpu_affinity, p.decode.cpu_affinity) for p in two.values()} == {((0,), (1,))}
    for product in [*one.values(), *two.values()]:
        assert product.decode.autoscaling.max_replicas == 1


def test_report_core_placement_gives_report_decode_a_core_of_its_own(tmp_path: Path) -> None:
    (_, colocated), (_, disaggregated) = COMPARISONS["placement-report-core"]
    one = load_products(write_variant(PRODUCTS, colocated, tmp_path / "c").parent / "products")
    assert {n: p.decode.cpu_affinity for n, p in one.items()} == {"report-gen": (1,), "support-chat": (0,)}
    two = load_products(write_variant(PRODUCTS, disaggregated, tmp_path / "d").parent / "products")
    cores = {(n, role): getattr(p, role).cpu_affinity for n, p in two.items() for role in ("prefill", "decode")}
    assert [k for k, v in cores.items() if v == (1,)] == [("report-gen", "decode")]


def test_kv_scale_keeps_the_split_by_role(tmp_path: Path) -> None:
    (_, colocated), (_, disaggregated) = COMPARISONS["pool-sized"]
    for override, tag in ((colocated, "c"), (disaggregated, "d")):
        base = load_products(write_variant(PRODUCTS, override, tmp_path / tag).parent / "products")
        doubled = load_products(write_variant(PRODUCTS, override, tmp_path / f"{tag}2", kv_scale=2).parent / "products")
        for name, product in base.items():
            for role in ("prefill", "decode"):
                before = product.engine_config(getattr(product, role)).kv_cache_bytes
                assert doubled[name].engine_config(getattr(doubled[name], role)).kv_cache_bytes == 2 * before


def test_serve_model_replaces_every_products_model(tmp_path: Path) -> None:
    config = write_variant(PRODUCTS, {}, tmp_path / "v", model=str(tmp_path))
    for product in load_products(config.parent / "products").values():
        assert product.model == str(tmp_path)


def test_parse_counters_sums_per_product() -> None:
    text = "\n".join([
        f"# TYPE {PREFIX}prompt_tokens_computed counter",
        f'{PREFIX}prompt_tokens_computed_total{{product="support-chat"}} 120.0',
        f'{PREFIX}prompt_tokens_computed_total{{product="report-gen"}} 30.0',
        f"# TYPE {PREFIX}prompt_tokens_cached counter",
        f'{PREFIX}prompt_tokens_cached_total{{product="support-chat"}} 448.0',
        f"# TYPE {PREFIX}num_requests_running gauge",
        f'{PREFIX}num_requests_running{{product="support-chat"}} 3.0',
        "",
    ])
    counters = parse_counters(text)
    assert counters["prompt_tokens_computed"] == {"support-chat": 120.0, "report-gen": 30.0}
    assert counters["prompt_tokens_cached"] == {"support-chat": 448.0}
    assert counters["generation_tokens"] == {}


def _record(product: str, ttft: float, gaps: list[float]) -> RequestRecord:
    return RequestRecord(request_id="r", product=product, sent_s=0.0, outcome=OK, ttft_s=ttft,
                         e2e_s=ttft + sum(gaps), itl_s=tuple(gaps), output_tokens=len(gaps) + 1)


def test_report_puts_both_variants_and_their_ratio_side_by_side() -> None:
    slos = {"chat": SLO(ttft_s=1.0, itl_s=0.2)}
    slow = summarize([_record("chat", 0.4, [0.1] * 9)], slos, wall_s=10.0)
    fast = summarize([_record("chat", 0.2, [0.05] * 9)], slos, wall_s=10.0)
    counters = {"prompt_tokens_computed": {"chat": 100.0}, "prompt_tokens_cached": {"chat": 0.0}}
    results = [VariantResult("colocated", slow, counters, counters),
               VariantResult("disaggregated", fast, counters, counters)]
    text = report("placement", results, "python -m bench.serving_compare placement")
    assert "| chat | colocated | 1 / 1 | 400 / 400 | 100 / 100 |" in text
    assert "| chat | 2.00x | 2.00x | 2.00x | 2.00x | 1.00x | 1.00x |" in text
    assert "| chat | colocated | 100 | 0 | 100 |" in text


def test_prefix_caching_off_deploys_prefill_without_the_directory(tmp_path: Path) -> None:
    """The "prefix cache off" variant turns off the cluster layer too: its prefill deployments get no
    directory to look up or publish to. (Reads the bound arguments through Serve's Application object.)"""
    from cluster.app import build_app
    from cluster.prefix_directory import DIRECTORY_NAME

    def directories(override: dict) -> set:
        config = write_variant(PRODUCTS, override, tmp_path / str(len(list(tmp_path.iterdir()))))
        ingress = build_app(load_products(config.parent / "products"))._bound_deployment
        prefills = ingress.init_args[2]
        return {app._bound_deployment.init_args[2] for app in prefills.values()}

    (_, off), (_, on) = COMPARISONS["prefix"]
    assert directories(off) == {None}
    assert directories(on) == {DIRECTORY_NAME}

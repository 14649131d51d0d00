"""bench/goodput_sweep.py: the systems are valid deployments of what their labels say, points count a 429
as sent and missed, and the verdict is taken where the best alternative first drops under 90%. The sweep
itself needs a cluster per system and the vLLM peer; BENCHMARKS.md has it."""

from __future__ import annotations

import math
import socket
from pathlib import Path

import pytest
import yaml

from bench.goodput_sweep import (
    KV_BYTES,
    REPORT_SEAT_SHARE,
    SYSTEMS,
    Point,
    _wait_port_free,
    in_dtype,
    load_seed,
    point,
    table,
    verdict,
)
from bench.load_stats import OK, RATE_LIMITED, RequestRecord, summarize
from bench.serving_compare import write_variant
from cluster.products import SLO, load_products

PRODUCTS = Path(__file__).resolve().parent.parent / "deploy" / "products"


def _engines_kv(product) -> int:
    """KV bytes the product's pool holds in all: its engines' bytes times their replicas."""
    roles = [product.prefill, product.decode] if product.disaggregated else [product.decode]
    return sum(product.engine_config(role).kv_cache_bytes * role.autoscaling.max_replicas for role in roles)


def test_every_system_deploys_what_its_label_says(tmp_path: Path) -> None:
    for name, system in SYSTEMS.items():
        if system.override is None:  # the vLLM peer: no product files
            assert not system.candidate
            continue
        config = write_variant(PRODUCTS, system.override, tmp_path / name)
        products = load_products(yaml.safe_load(config.read_text())["applications"][0]["args"]["products_dir"])
        for product in products.values():
            assert product.disaggregated == name.startswith("disaggregated")
            assert (product.engine_config().scheduling == "slo") == system.candidate
            assert (product.reject_past_ttft is not None) == system.candidate
            assert _engines_kv(product) == KV_BYTES  # the same KV memory as every other system
        shares = {product.name: product.decode_seat_share for product in products.values()}
        expected = {"report-gen": REPORT_SEAT_SHARE, "support-chat": None} if name.endswith("seats") else \
            {"report-gen": None, "support-chat": None}
        assert shares == expected
        if "margin" in name:  # a report refused at the chat's TTFT target, 1 s of its 3 s
            margins = {product.name: product.reject_past_s for product in products.values()}
            assert margins == pytest.approx({"report-gen": 1.0, "support-chat": 1.0})


@pytest.mark.parametrize("name", ["colocated-slo", "disaggregated-seats", "single-fcfs"])
def test_a_dtype_reaches_every_engine(tmp_path: Path, name: str) -> None:
    config = write_variant(PRODUCTS, in_dtype(SYSTEMS[name].override, "bfloat16"), tmp_path / name)
    products = load_products(yaml.safe_load(config.read_text())["applications"][0]["args"]["products_dir"])
    for product in products.values():
        roles = [product.prefill, product.decode] if product.disaggregated else [product.decode]
        assert {product.engine_config(role).dtype for role in roles} == {"bfloat16"}
        assert _engines_kv(product) == KV_BYTES  # the budget stays in bytes


def _p(system: str, rate: float, met: int, sent: int = 100, chat_p99: float | None = 0.5) -> Point:
    return Point(system=system, rate=rate, duration_s=100.0, sent=sent, met=met, rejected=0, failed=0,
                 chat_sent=sent // 2, chat_met=met // 2, chat_ttft_p99_s=chat_p99, chat_ttft_slo_s=1.0)


def test_verdict_is_taken_at_the_first_rate_the_best_alternative_drops() -> None:
    points = [
        _p("colocated-fcfs", 0.5, 98), _p("vllm", 0.5, 99), _p("colocated-slo", 0.5, 99),
        # 1.0: colocated FCFS drops under 90% but vLLM still meets 92%: no verdict here
        _p("colocated-fcfs", 1.0, 70), _p("vllm", 1.0, 92), _p("colocated-slo", 1.0, 95),
        # 1.5: every alternative drops; vLLM is the best of them
        _p("colocated-fcfs", 1.5, 30), _p("vllm", 1.5, 50), _p("colocated-slo", 1.5, 80),
        _p("disaggregated-slo", 1.5, 60, chat_p99=2.0),
        _p("colocated-fcfs", 2.0, 10), _p("vllm", 2.0, 20), _p("colocated-slo", 2.0, 85),
    ]
    v = verdict(points)
    assert v is not None and v.rate == 1.5
    assert v.alternative.system == "vllm" and v.candidate.system == "colocated-slo"
    assert math.isclose(v.ratio, 80 / 50)
    assert v.chat_ttft_ok_up_to_rate


def test_verdict_reports_a_chat_ttft_miss_before_the_drop() -> None:
    points = [_p("vllm", 0.5, 95), _p("colocated-slo", 0.5, 99, chat_p99=1.2),
              _p("vllm", 1.0, 40), _p("colocated-slo", 1.0, 90)]
    v = verdict(points)
    assert v is not None and v.rate == 1.0 and not v.chat_ttft_ok_up_to_rate


def test_no_verdict_while_an_alternative_holds_or_without_a_candidate() -> None:
    assert verdict([_p("vllm", 1.0, 95), _p("colocated-slo", 1.0, 99)]) is None
    assert verdict([_p("vllm", 1.0, 10), _p("colocated-fcfs", 1.0, 20)]) is None
    v = verdict([_p("vllm", 1.0, 0), _p("colocated-slo", 1.0, 50)])
    assert v is not None and v.ratio == math.inf


def _record(product: str, outcome: str, ttft: float | None, tokens: int = 10) -> RequestRecord:
    ok = outcome == OK
    return RequestRecord(request_id="r", product=product, sent_s=0.0, outcome=outcome, ttft_s=ttft,
                         e2e_s=ttft + 0.1 * (tokens - 1) if ok else None, output_tokens=tokens if ok else 0,
                         itl_s=(0.1,) * (tokens - 1) if ok else ())


def test_point_counts_a_429_as_sent_and_missed() -> None:
    slos = {"support-chat": SLO(ttft_s=1.0, itl_s=0.2), "report-gen": SLO(ttft_s=3.0, itl_s=0.25)}
    records = [_record("support-chat", OK, 0.4), _record("support-chat", OK, 1.5),
               _record("support-chat", RATE_LIMITED, None), _record("report-gen", OK, 2.0),
               _record("report-gen", "500", None)]
    p = point("colocated-slo", 1.0, 50.0, summarize(records, slos, wall_s=80.0))
    assert (p.sent, p.met, p.rejected, p.failed) == (5, 2, 1, 1)
    assert (p.chat_sent, p.chat_met) == (3, 1)
    assert math.isclose(p.goodput, 2 / 50.0)  # per second of the sending window, not of the drain
    assert math.isclose(p.attainment, 0.4)
    text = table([p])
    assert "2/5 (40%)" in text and "1 429" in text and SYSTEMS["colocated-slo"].label in text


def test_every_load_of_a_sweep_sends_its_own_requests() -> None:
    """The warm-up and each rate get distinct seeds (no prompt found cached from an earlier load), and a rate's
    seed is the same for every system."""
    seeds = [load_seed(0, None), *(load_seed(0, r) for r in (0.5, 1, 1.5, 2, 2.5, 3, 4))]
    assert len(set(seeds)) == len(seeds)
    assert load_seed(7, 2.5) == load_seed(7, 2.5) != load_seed(8, 2.5)


def test_the_next_system_waits_for_the_port_the_last_one_held() -> None:
    """A server still listening holds the sweep's port (the next system would find it taken): the wait gives
    up with a clear error; once it is closed the port is free at once."""
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        with pytest.raises(RuntimeError, match=f"port {port} still taken"):
            _wait_port_free(port, deadline_s=0.5)
    _wait_port_free(port, deadline_s=5.0)

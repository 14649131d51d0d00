"""`pdserve bench`: statistics on synthetic samples, dispatch bounds with a fake server, the report files,
the 127.0.0.1-only rule, and the quick mode against the real app (tests/conftest.py's pdserve_url)."""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import math
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from bench.load_bench import add_arguments, plan_from_args
from bench.load_client import ChatSender, Endpoint, StreamTiming, require_local
from bench.load_dispatch import Limits, run_load
from bench.load_report import CDF_PNG, REQUESTS_JSONL, RESULTS_JSON, RESULTS_MD, write_report
from bench.load_stats import ALL, CANCELLED, CLIENT_ERROR, OK, RequestRecord, meets_slo, percentiles, summarize
from bench.prompt_text import builtin_tokenizer
from bench.workload import ChatRequest, Concurrency, Poisson, chat_requests, default_mix
from cluster import cli
from cluster.products import SLO

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ---- statistics ---------------------------------------------------------------------------------------------

def _interpolated(values: list[float], q: float) -> float:
    """Reference percentile: linear between the order statistics at rank (n - 1) * q / 100."""
    s = sorted(values)
    rank = (len(s) - 1) * q / 100
    lo, hi = math.floor(rank), math.ceil(rank)
    return s[lo] + (s[hi] - s[lo]) * (rank - lo)


def test_percentiles_interpolate_and_are_ordered() -> None:
    values = [0.001 * (i * 37 % 101) + 0.0005 * i for i in range(101)]  # unsorted, uneven
    p = percentiles(values)
    assert p.count == 101 and p.mean == pytest.approx(sum(values) / 101)
    for q, got in ((50, p.p50), (90, p.p90), (99, p.p99)):
        assert got == pytest.approx(_interpolated(values, q))
    assert p.p50 <= p.p90 <= p.p99
    assert percentiles([]).p50 is None and percentiles([]).count == 0
    assert percentiles([2.5]).p99 == 2.5


def _rec(product: str, outcome: str = OK, ttft: float = 0.1, e2e: float = 1.0, tokens: int = 10,
         i: int = 0) -> RequestRecord:
    gaps = tuple([(e2e - ttft) / (tokens - 1)] * (tokens - 1)) if outcome == OK and tokens > 1 else ()
    if outcome != OK:
        return RequestRecord(f"r{i}", product, sent_s=0.0, outcome=outcome)
    return RequestRecord(f"r{i}", product, sent_s=0.0, outcome=outcome, ttft_s=ttft, e2e_s=e2e, itl_s=gaps,
                         output_tokens=tokens)


def test_slo_needs_success_ttft_and_time_per_token_within_targets() -> None:
    slo = SLO(ttft_s=1.0, itl_s=0.1)
    assert meets_slo(_rec("a", ttft=0.5, e2e=0.5 + 9 * 0.09), slo)
    assert not meets_slo(_rec("a", ttft=1.5, e2e=1.5 + 9 * 0.09), slo)  # TTFT too slow
    assert not meets_slo(_rec("a", ttft=0.5, e2e=0.5 + 9 * 0.11), slo)  # tokens too slow on average
    assert meets_slo(_rec("a", ttft=0.5, e2e=0.5, tokens=1), slo)  # one token: only TTFT applies
    assert not meets_slo(_rec("a", outcome="503"), slo)


def test_summary_counts_add_up_and_rates_use_the_wall_time() -> None:
    slos = {"a": SLO(ttft_s=1.0, itl_s=0.1), "b": SLO(ttft_s=0.2, itl_s=0.1), "idle": SLO()}
    records = [_rec("a", ttft=0.5, e2e=0.5 + 9 * 0.05, i=0), _rec("a", ttft=2.0, e2e=3.0, i=1),
               _rec("a", outcome="429", i=2), _rec("a", outcome="429", i=3), _rec("b", outcome="503", i=4),
               _rec("b", ttft=0.1, e2e=0.1 + 19 * 0.05, tokens=20, i=5), _rec("b", outcome=CANCELLED, i=6)]
    s = summarize(records, slos, wall_s=4.0)
    assert set(s.products) == {"a", "b", "idle", ALL}
    a, b, everything = s.products["a"], s.products["b"], s.products[ALL]
    for p in s.products.values():
        assert p.sent == p.ok + sum(p.errors.values())
    assert (a.sent, a.ok, a.rate_limited, dict(a.errors)) == (4, 2, 2, {"429": 2})
    assert dict(b.errors) == {"503": 1, CANCELLED: 1} and b.rate_limited == 0
    assert s.products["idle"].sent == 0 and s.products["idle"].ttft.p50 is None
    assert (a.slo_met, b.slo_met, everything.slo_met) == (1, 1, 2)  # the second "a" misses TTFT
    assert a.goodput_req_per_s == pytest.approx(1 / 4.0) and everything.goodput_req_per_s == pytest.approx(2 / 4.0)
    assert a.output_tokens == 20 and a.output_tok_per_s == pytest.approx(20 / 4.0)
    assert everything.output_tok_per_s == pytest.approx(a.output_tok_per_s + b.output_tok_per_s)
    assert everything.req_per_s == pytest.approx(3 / 4.0)
    assert a.ttft.p50 == pytest.approx(1.25) and b.itl.count == 19
    with pytest.raises(ValueError):
        summarize(records, slos, wall_s=0.0)


# ---- timing one stream -------------------------------------------------------------------------------------

def _chunk(content: str | None = None, usage: SimpleNamespace | None = None) -> SimpleNamespace:
    choices = [] if usage is not None else [SimpleNamespace(delta=SimpleNamespace(content=content))]
    return SimpleNamespace(choices=choices, usage=usage)


def _timed(chunks: list[SimpleNamespace], gap_s: float = 0.01) -> RequestRecord:
    timing = StreamTiming(time.perf_counter())
    for chunk in chunks:
        time.sleep(gap_s)
        timing.observe(chunk)
    return timing.record({"request_id": "r", "product": "a", "sent_s": 0.0})


def test_stream_timing_starts_at_the_first_content_and_counts_usage_tokens() -> None:
    details = SimpleNamespace(cached_tokens=16)
    usage = SimpleNamespace(completion_tokens=7, prompt_tokens=30, prompt_tokens_details=details)
    record = _timed([_chunk(""), _chunk(""), _chunk("a"), _chunk("b"), _chunk("cd"), _chunk(usage=usage)])
    assert record.ok and record.output_tokens == 7 and (record.prompt_tokens, record.cached_tokens) == (30, 16)
    assert record.ttft_s >= 0.025  # two role-only chunks came first: not tokens
    assert len(record.itl_s) == 2 and all(gap >= 0.005 for gap in record.itl_s)
    assert record.e2e_s >= record.ttft_s + sum(record.itl_s)


def test_stream_timing_counts_chunks_without_usage_and_flags_empty_streams() -> None:
    record = _timed([_chunk("a"), _chunk("b"), _chunk("c")], gap_s=0.0)
    assert record.ok and record.output_tokens == 3 and record.prompt_tokens is None
    assert _timed([_chunk("")], gap_s=0.0).outcome == "stream_error"


# ---- where load may go --------------------------------------------------------------------------------------

@pytest.mark.parametrize("url", ["http://10.1.2.3:8000/v1", "http://example.com/v1", "https://api.openai.com/v1",
                                 "http://127.0.0.1.example.com/v1", "ftp://127.0.0.1/v1", "http://0.0.0.0:8000/v1"])
def test_non_local_urls_are_refused(url: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="127.0.0.1"):
        require_local(url)
    with pytest.raises(ValueError, match="127.0.0.1"):
        Endpoint(base_url=url, models={"a": "a"})
    with pytest.raises(ValueError, match="127.0.0.1"):
        cli.main(["bench", "--quick", "--no-progress", "--base-url", url, "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_local_urls_are_accepted() -> None:
    for url in ("http://127.0.0.1:8000/v1", "http://localhost:8001/v1", "https://localhost/v1"):
        assert require_local(url) == url


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


def test_system_prompt_goes_where_the_server_does_not_add_it() -> None:
    pdserve = plan_from_args(_args("--quick"))
    assert pdserve.models == {"support-chat": "support-chat", "report-gen": "report-gen"}
    assert pdserve.include_system is False  # pdserve's products add their own
    vllm = plan_from_args(_args("--quick", "--model", "small"))
    assert vllm.models == {"support-chat": "small", "report-gen": "small"} and vllm.include_system is True
    assert plan_from_args(_args("--quick", "--system-prompt", "client")).include_system is True
    mapped = plan_from_args(_args("--model-map", "report-gen=big", "--slo", "report-gen=5,0.5", "--rate", "3"))
    assert mapped.models["report-gen"] == "big" and mapped.slos["report-gen"] == SLO(ttft_s=5, itl_s=0.5)
    assert mapped.slos["support-chat"] == SLO(ttft_s=1.0, itl_s=0.2)  # deploy/products/support-chat.yaml
    assert mapped.arrival == Poisson(3.0) and pdserve.arrival == Concurrency(4)
    assert (pdserve.limits.max_requests, pdserve.mix.scale) == (32, 0.05) and mapped.limits.max_requests is None


def test_prompts_are_sized_for_the_served_models_tokenizer_and_eos_is_optional() -> None:
    shipped = plan_from_args(_args("--quick"))
    assert shipped.tokenizer == "smollm2-135m-instruct"  # deploy/products' model
    assert shipped.ignore_eos is True and shipped.settings()["ignore_eos"] is True
    real = plan_from_args(_args("--quick", "--tokenizer", "tiny", "--eos"))
    assert real.tokenizer == "tiny" and real.ignore_eos is False
    request = next(iter(chat_requests(default_mix(scale=0.05), Concurrency(1), 0, builtin_tokenizer())))
    for ignore_eos in (True, False):
        sender = ChatSender(Endpoint(base_url="http://127.0.0.1:1/v1", models={request.product: "m"},
                                     ignore_eos=ignore_eos))
        assert sender._body(request)["extra_body"] == {"ignore_eos": ignore_eos}


# ---- dispatch, against a fake server ------------------------------------------------------------------------

def _requests(n: int, gap_s: float | None = None) -> list[ChatRequest]:
    return [ChatRequest(f"req-{i}", "a", "sys", "hi", 1, 5, 2, None if gap_s is None else (i + 1) * gap_s)
            for i in range(n)]


class FakeServer:
    """send() that takes `latency_s` and tracks how many requests were in flight at once."""

    def __init__(self, latency_s: float, fail: bool = False) -> None:
        self.latency_s, self.fail, self.in_flight, self.peak = latency_s, fail, 0, 0

    async def __call__(self, request: ChatRequest, t0: float) -> RequestRecord:
        sent = time.perf_counter() - t0
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            await asyncio.sleep(self.latency_s)
            if self.fail:
                raise RuntimeError("client bug")
        finally:
            self.in_flight -= 1
        return RequestRecord(request.request_id, request.product, sent, OK, ttft_s=0.01, e2e_s=self.latency_s,
                             output_tokens=2)


def test_closed_loop_keeps_the_concurrency_and_the_count() -> None:
    server = FakeServer(0.05)
    seen = []
    result = asyncio.run(run_load(_requests(100), Concurrency(3), Limits(duration_s=30, max_requests=12), server,
                                  on_record=seen.append))
    assert server.peak == 3
    assert [r.request_id for r in result.records] == [f"req-{i}" for i in range(12)]
    assert sorted(r.request_id for r in seen) == sorted(r.request_id for r in result.records)
    assert 4 * 0.05 <= result.wall_s < 5.0  # 12 requests, 3 at a time: at least 4 rounds


def test_open_loop_sends_at_arrival_times_until_the_duration() -> None:
    requests = _requests(200, gap_s=0.02)  # one every 20 ms, for 4 s
    result = asyncio.run(run_load(requests, Poisson(50.0), Limits(duration_s=0.5, drain_s=5), FakeServer(0.3)))
    expected = [r for r in requests if r.arrival_s < 0.5]
    assert [r.request_id for r in result.records] == [r.request_id for r in expected]
    for record, request in zip(result.records, expected, strict=True):
        assert request.arrival_s - 0.005 <= record.sent_s <= request.arrival_s + 0.25  # busy machine: late, never early
    # open loop: requests overlap (each takes 0.3 s, one arrives every 20 ms) instead of queueing client-side
    assert all(r.outcome == OK for r in result.records) and result.wall_s >= 0.3


def test_requests_still_running_after_the_drain_are_cancelled_and_counted() -> None:
    start = time.perf_counter()
    result = asyncio.run(run_load(_requests(50), Concurrency(4), Limits(duration_s=0.2, drain_s=0.2),
                                  FakeServer(30.0)))
    assert time.perf_counter() - start < 5.0
    assert len(result.records) == 4 and {r.outcome for r in result.records} == {CANCELLED}


def test_a_failing_sender_is_recorded_not_lost() -> None:
    result = asyncio.run(run_load(_requests(5), Concurrency(2), Limits(duration_s=10, max_requests=5),
                                  FakeServer(0.0, fail=True)))
    assert len(result.records) == 5 and {r.outcome for r in result.records} == {CLIENT_ERROR}
    assert "client bug" in result.records[0].error


# ---- report files -------------------------------------------------------------------------------------------

def test_report_files_are_written(tmp_path: Path) -> None:
    records = [_rec(p, ttft=0.05 * (i + 1), e2e=0.5 * (i + 1), i=i) for i, p in enumerate(["a", "b"] * 5)]
    records.append(_rec("b", outcome="429", i=99))
    summary = summarize(records, {"a": SLO(), "b": SLO()}, wall_s=3.0)
    paths = write_report(summary, records, {"seed": 1}, tmp_path / "out")
    doc = json.loads(paths[RESULTS_JSON].read_text())
    assert doc["products"]["b"]["rate_limited"] == 1 and doc["products"]["a"]["slo"] == SLO().model_dump()
    assert len(paths[REQUESTS_JSONL].read_text().splitlines()) == len(records)
    md = paths[RESULTS_MD].read_text()
    assert all(f"| {p} |" in md for p in ("a", "b", ALL))
    assert paths[CDF_PNG].read_bytes()[:8] == PNG_MAGIC


# ---- the real app -------------------------------------------------------------------------------------------

def _load(out: Path) -> tuple[dict, list[dict]]:
    return (json.loads((out / RESULTS_JSON).read_text()),
            [json.loads(line) for line in (out / REQUESTS_JSONL).read_text().splitlines()])


def test_quick_bench_against_pdserve(pdserve_url: str, tmp_path: Path) -> None:
    import matplotlib.image

    from bench.prompt_text import builtin_tokenizer
    from bench.workload import chat_requests, default_mix

    out = tmp_path / "quick"
    start = time.perf_counter()
    code = cli.main(["bench", "--quick", "--no-progress", "--base-url", f"{pdserve_url}/v1",
                     "--product-key", "report-gen=sk-report-test", "--tokenizer", "tiny", "--out", str(out)])
    assert code == 0 and time.perf_counter() - start < 60
    doc, rows = _load(out)
    assert set(doc["products"]) == {"support-chat", "report-gen", ALL}
    for name, p in doc["products"].items():
        assert p["sent"] > 0 and p["sent"] == p["ok"] + sum(p["errors"].values()), name
        assert p["ok"] == p["sent"], p["errors"]  # 4 in flight: far below support-chat's queue of 24
        for metric in ("ttft", "itl", "e2e"):
            q = p[metric]
            assert 0 < q["p50"] <= q["p90"] <= q["p99"], (name, metric, q)
        assert p["output_tok_per_s"] > 0 and 0 <= p["goodput_req_per_s"] <= p["req_per_s"]
    assert len(rows) == doc["products"][ALL]["sent"] == 32
    # the same requests the workload defines: exact output lengths (ignore_eos) and prompt lengths
    # (pdserve added the system prompt itself; the tokens match the client-side count)
    expected = {r.request_id: r for r in itertools.islice(
        chat_requests(default_mix(scale=0.05), Concurrency(4), 0, builtin_tokenizer()), 32)}
    for row in rows:
        assert row["output_tokens"] == expected[row["request_id"]].max_tokens
        assert row["prompt_tokens"] == expected[row["request_id"]].prompt_tokens
    # never more than 4 requests in flight
    events = sorted([(r["sent_s"], 1) for r in rows] + [(r["sent_s"] + r["e2e_s"], -1) for r in rows])
    assert max(itertools.accumulate(step for _, step in events)) <= 4
    assert (out / RESULTS_MD).read_text().count("| report-gen |") == 2
    image = matplotlib.image.imread(out / CDF_PNG)
    assert image.shape[0] > 100 and image.shape[1] > 300


def test_errors_are_counted_by_status_code(pdserve_url: str, tmp_path: Path) -> None:
    out = tmp_path / "nokey"
    code = cli.main(["bench", "--quick", "--no-progress", "--requests", "10", "--base-url", f"{pdserve_url}/v1",
                     "--out", str(out)])  # no key for report-gen
    assert code == 0
    doc, rows = _load(out)
    report, chat = doc["products"]["report-gen"], doc["products"]["support-chat"]
    assert report["sent"] > 0 and report["ok"] == 0 and report["errors"] == {"401": report["sent"]}
    assert chat["ok"] == chat["sent"] > 0
    assert doc["products"][ALL]["sent"] == len(rows) == 10

"""The "slo" scheduling policy: deadline order, prompt chunks sized for ITL, slack-based preemption, the KV
watermark. Scheduler tests drive the real KV managers without a model; engine tests run the tiny model."""

from __future__ import annotations

import math
import time

import pytest

from engine import Engine, EngineConfig, SamplingParams
from engine.arrival_rate import ArrivalRate
from engine.config import SLO
from engine.kv_cache_manager import KVCacheManager
from engine.request import DEFAULT_TTFT_S, Request, RequestStatus
from engine.scheduler import OverloadedError, Scheduler
from engine.step_cost import StepCost
from tests.engine_helpers import random_prompts

BS = 16
CHAT = SLO(ttft_s=1.0, itl_s=0.2)
REPORT = SLO(ttft_s=3.0, itl_s=0.25)


def _request(rid: str, prompt_len: int, slo: SLO | None, max_tokens: int = 64, arrival: float = 0.0) -> Request:
    return Request(rid, list(range(3, 3 + prompt_len)), SamplingParams(max_tokens=max_tokens), b"", 4096,
                   arrival_time=arrival, slo=slo)


def _scheduler(policy: str, num_blocks: int = 64, budget: int = 256, watermark: int = 0) -> Scheduler:
    return Scheduler(KVCacheManager(num_blocks, BS, enable_caching=False), max_num_seqs=16,
                     max_num_batched_tokens=budget, policy=policy, watermark_tokens=watermark)


def _step(s: Scheduler) -> list[tuple[Request, int]]:
    """One schedule, with the computed counts advanced as the engine's forward would."""
    scheduled = s.schedule().scheduled
    for r, n in scheduled:
        r.num_computed_tokens += n
    return scheduled


def _run_prompts(s: Scheduler, *reqs: Request) -> None:
    """Admit reqs in one step (the budget must hold their prompts) and give each its first token."""
    for req in reqs:
        s.add(req)
    assert {id(r) for r, _ in _step(s)} == {id(r) for r in reqs}
    for req in reqs:
        assert req.num_computed_tokens == req.num_tokens
        req.append_token(7)


# ---- the step cost model -----------------------------------------------------------------------
def test_step_cost_learns_base_and_per_token_costs() -> None:
    cost = StepCost()
    assert cost.prefill_budget(0.1) is None  # nothing seen: no limit
    cost.observe(num_decodes=4, prefill_tokens=0, seconds=0.02)
    assert cost.base_s == pytest.approx(0.02) and cost.prefill_budget(0.1) is None
    cost.observe(num_decodes=4, prefill_tokens=100, seconds=0.12)  # 0.02 base + 100 x 1 ms
    assert cost.per_token_s == pytest.approx(0.001)
    assert cost.prefill_budget(0.1) == 80
    assert cost.prefill_budget(0.01) == 0  # the decodes alone take longer than that
    cost.observe(num_decodes=0, prefill_tokens=50, seconds=0.1)  # a prompt-only step: 2 ms per token
    assert cost.per_token_s == pytest.approx(0.8 * 0.001 + 0.2 * 0.002)
    assert cost.prompt_fixed_s == 0.0  # one prompt-only size seen: no line to fit yet


def test_step_cost_separates_a_prompt_steps_fixed_cost_from_its_tokens() -> None:
    """Steps of a few uncached tokens are mostly fixed cost: dividing it by their tokens would price a token
    several times too high, and a prediction would refuse requests that meet their SLO."""
    cost = StepCost()
    for _ in range(20):
        for size in (8, 32, 512):
            cost.observe(num_decodes=0, prefill_tokens=size, seconds=0.035 + 0.002 * size)
    assert cost.prompt_fixed_s == pytest.approx(0.035, rel=1e-3)
    assert cost.per_token_s == pytest.approx(0.002, rel=1e-3)


def _learn_decode_line(cost: StepCost, intercept_s: float, per_decode_s: float) -> None:
    for _ in range(20):
        for decodes in (2, 8, 16):
            cost.observe(num_decodes=decodes, prefill_tokens=0, seconds=intercept_s + per_decode_s * decodes)


def test_decode_seats_follow_the_decode_line_and_the_time_prompts_need() -> None:
    cost = StepCost()
    assert cost.decode_seats(0.2, 0.0) is None  # no step that decoded yet: no limit
    cost.observe(num_decodes=10, prefill_tokens=0, seconds=0.05)
    assert cost.decode_seats(0.2, 0.0) == 40  # one batch size seen: the line through the origin, 5 ms a decode
    cost = StepCost()
    _learn_decode_line(cost, 0.02, 0.016)
    assert (cost.decode_seats(0.2, 0.0), cost.decode_seats(0.25, 0.0)) == (11, 14)  # (0.2 - 0.02) / 0.016
    cost.per_token_s = 0.001
    assert cost.decode_seats(0.2, 400.0) == 6  # prompts need 40% of the time: (0.6 x 0.2 - 0.02) / 0.016
    assert cost.decode_seats(0.2, 5000.0) == 0


def test_the_arrival_rate_averages_over_its_time_constant() -> None:
    rate = ArrivalRate(tau_s=20.0)
    assert rate.per_s(0.0) == 0.0
    for i in range(2000):  # 10 tokens every 0.1 s for 200 s: 100 tokens/s
        rate.add(10, now=i * 0.1)
    assert rate.per_s(200.0) == pytest.approx(100.0, rel=0.03)
    assert rate.per_s(220.0) == pytest.approx(rate.per_s(200.0) * math.exp(-1))  # none since: decays
    assert rate.per_s(100.0) == pytest.approx(rate.per_s(200.0), rel=0.03)  # the clock going back: no growth


def test_queued_prompt_tokens_take_decode_seats() -> None:
    s = _scheduler("slo")
    _learn_decode_line(s.cost, 0.02, 0.016)
    s.cost.per_token_s = 0.001
    s.check_decode_seats([_request(f"r{i}", 20, CHAT) for i in range(11)], 1.0)  # no prompt traffic: 11 seats
    for i in range(3):
        s.add(_request(f"long{i}", 2000, None))  # 6,000 tokens in a moment: ~300/s over the next 20 s
    with pytest.raises(OverloadedError, match="allow 7"):  # (0.7 x 0.2 - 0.02) / 0.016 = 7.5
        s.check_decode_seats([_request(f"r{i}", 20, CHAT) for i in range(11)], 1.0)


@pytest.mark.parametrize("share, running, refused", [(1.0, 10, False), (1.0, 11, True), (0.5, 4, False),
                                                     (0.5, 5, True)])
def test_decode_seats_refuse_past_the_requests_share(share: float, running: int, refused: bool) -> None:
    """11 seats at the chat's 0.2 s ITL target: a request whose share is the whole engine takes the 11th, one
    with half of it is refused from the 6th on, leaving the rest to requests with a larger share."""
    s = _scheduler("slo")
    _learn_decode_line(s.cost, 0.02, 0.016)
    reports = [_request(f"r{i}", 20, REPORT, max_tokens=300 - i) for i in range(running)]
    _run_prompts(s, *reports)
    chat = _request("chat", 20, CHAT)
    if not refused:
        s.check_decode_seats([*s.running, chat], share)
        return
    with pytest.raises(OverloadedError, match=f"{running + 1} requests would decode where the ITL targets and "
                                              f"max_num_seqs allow 11") as info:
        s.check_decode_seats([*s.running, chat], share)
    steps_to_a_seat = 300 - running + 1 - 1  # the report with the fewest tokens left ends first
    assert info.value.retry_after_s == pytest.approx(steps_to_a_seat * s.cost.decode_step_s)


def test_decode_seats_count_only_requests_with_an_itl_target_for_the_limit() -> None:
    s = _scheduler("slo")  # max_num_seqs 16
    _learn_decode_line(s.cost, 0.02, 0.016)
    s.check_decode_seats([_request(f"free{i}", 20, None) for i in range(16)], 1.0)  # no target: max_num_seqs
    with pytest.raises(OverloadedError, match="allow 16"):
        s.check_decode_seats([_request(f"free{i}", 20, None) for i in range(17)], 1.0)
    with pytest.raises(OverloadedError, match="allow 14"):  # the report's 0.25 s target: 14 seats
        s.check_decode_seats([*(_request(f"free{i}", 20, None) for i in range(14)), _request("r", 20, REPORT)], 1.0)


@pytest.mark.parametrize("share, committed, refused", [(1.0, 16, False), (1.0, 17, True), (0.75, 12, False),
                                                       (0.75, 13, True)])
def test_decode_seats_are_max_num_seqs_before_a_decode_step_is_timed_or_where_itl_allows_more(
        share: float, committed: int, refused: bool) -> None:
    """Long answers with a share under 1 leave free seats for the rest, even while the ITL line is unknown
    (early in a run) or allows more than the engine seats."""
    s = _scheduler("slo")  # max_num_seqs 16
    requests = [_request(f"r{i}", 20, REPORT) for i in range(committed)]
    for learned in (False, True):
        if learned:
            _learn_decode_line(s.cost, 0.02, 0.001)  # ITL seats: (0.25 - 0.02) / 0.001 = 230
        if refused:
            with pytest.raises(OverloadedError, match="allow 16"):
                s.check_decode_seats(requests, share)
        else:
            s.check_decode_seats(requests, share)


# ---- which waiting request runs first ----------------------------------------------------------
@pytest.mark.parametrize("policy, first", [("fcfs", "report"), ("slo", "chat")])
def test_a_chat_prompt_does_not_queue_behind_a_long_report_prompt(policy: str, first: str) -> None:
    s = _scheduler(policy, budget=64)
    s.add(_request("report", 600, REPORT, arrival=0.0))  # deadline 3.0
    s.add(_request("chat", 40, CHAT, arrival=0.5))  # deadline 1.5
    assert [r.request_id for r, _ in s.schedule().scheduled][0] == first



@pytest.mark.parametrize("policy, order", [("fcfs", [("report", 64)]), ("slo", [("chat", 40), ("report", 24)])])
def test_a_chat_prompt_goes_before_the_next_chunk_of_a_report_prompt_already_started(
        policy: str, order: list[tuple[str, int]]) -> None:
    s = _scheduler(policy, num_blocks=128, budget=64)
    s.add(_request("report", 600, REPORT, arrival=0.0))  # deadline 3.0
    assert [(r.request_id, n) for r, n in _step(s)] == [("report", 64)]  # its first chunk: running from here
    chat = _request("chat", 40, CHAT, arrival=0.5)  # deadline 1.5
    predicted_tokens = 40 if policy == "slo" else 600 - 64 + 40
    s.cost.per_token_s = 0.001
    assert s.predicted_ttft_s(chat) == pytest.approx(predicted_tokens * 0.001)  # what goes before it
    s.add(chat)
    assert [(r.request_id, n) for r, n in _step(s)] == order
    for _ in range(10):  # the report's chunks go on around the chat's prompt
        _step(s)
    assert [(r.request_id, r.num_computed_tokens) for r in s.running] == [("report", 600), ("chat", 40)]


def test_deadlines_order_waiting_requests_and_requests_without_slo_age_into_the_front() -> None:
    s = _scheduler("slo", budget=16)
    s.add(_request("none", 16, None, arrival=0.0))  # deadline DEFAULT_TTFT_S
    s.add(_request("report", 16, REPORT, arrival=DEFAULT_TTFT_S - 2.0))  # deadline DEFAULT_TTFT_S + 1
    s.add(_request("chat", 16, CHAT, arrival=DEFAULT_TTFT_S - 1.5))  # deadline DEFAULT_TTFT_S - 0.5
    order = [r.request_id for _ in range(3) for r, _ in _step(s)]
    assert order == ["chat", "none", "report"]


# ---- prompt chunks sized for the running decodes' ITL -------------------------------------------
def test_prompt_chunks_keep_running_decodes_within_their_itl_target() -> None:
    s = _scheduler("slo", num_blocks=128, budget=2048)
    _run_prompts(s, _request("chat", 20, CHAT))
    s.cost.base_s, s.cost.per_token_s = 0.02, 0.001  # a 0.2 s step: the decode plus 180 prompt tokens
    s.add(_request("report", 1000, REPORT, arrival=1.0))
    out = s.schedule()
    assert [(r.request_id, n) for r, n in out.scheduled] == [("chat", 1), ("report", 180)]


@pytest.mark.parametrize("elapsed_s, chunk", [(0.1, (770, 780)), (0.85, (120, 130)), (5.0, (BS, BS))])
def test_prompt_chunks_use_the_slack_faster_steps_left_within_a_bounded_gap(elapsed_s: float,
                                                                           chunk: tuple[int, int]) -> None:
    """A chat decoding its 6th token, its 5 so far 0.1 s after its first: 0.2 s x 5 - 0.1 s = 0.9 s of
    slack, capped at MAX_GAP_TARGETS x 0.2 s = 0.8 s, i.e. 780 prompt tokens at 1 ms beside a 20 ms
    decode. After 0.85 s only 0.15 s is left (130 tokens); after 5 s it is behind: a block, no more."""
    s = _scheduler("slo", num_blocks=256, budget=2048)
    chat = _request("chat", 20, CHAT)
    _run_prompts(s, chat)
    for _ in range(4):
        chat.append_token(7)
    chat.num_computed_tokens = chat.num_tokens - 1  # decoding its next token
    chat.first_token_time = time.monotonic() - elapsed_s
    s.cost.base_s, s.cost.per_token_s = 0.02, 0.001
    s.add(_request("report", 1000, REPORT, arrival=1.0))
    n = dict((r.request_id, n) for r, n in s.schedule().scheduled)["report"]
    assert chunk[0] <= n <= chunk[1]


def test_a_prompt_still_progresses_when_the_decodes_alone_miss_the_target() -> None:
    s = _scheduler("slo", num_blocks=128, budget=2048)
    _run_prompts(s, _request("chat", 20, CHAT))
    s.cost.base_s, s.cost.per_token_s = 0.5, 0.001  # decodes alone take 0.5 s > 0.2 s
    s.add(_request("report", 1000, REPORT, arrival=1.0))
    assert dict((r.request_id, n) for r, n in s.schedule().scheduled)["report"] == BS


def test_fcfs_ignores_the_cost_model() -> None:
    s = _scheduler("fcfs", num_blocks=128, budget=2048)
    _run_prompts(s, _request("chat", 20, CHAT))
    s.cost.base_s, s.cost.per_token_s = 0.02, 0.001
    s.add(_request("report", 1000, REPORT, arrival=1.0))
    assert dict((r.request_id, n) for r, n in s.schedule().scheduled)["report"] == 1000


# ---- whom to preempt -----------------------------------------------------------------------------
@pytest.mark.parametrize("policy, victim", [("fcfs", "chat"), ("slo", "report")])
def test_preemption_takes_the_request_with_the_most_itl_slack(policy: str, victim: str) -> None:
    """Two running requests fill the pool; growing needs a block. fcfs preempts the newest (chat); slo the
    report, older but with the looser ITL target."""
    s = _scheduler(policy, num_blocks=4)
    report, chat = _request("report", 32, REPORT, arrival=0.0), _request("chat", 32, CHAT, arrival=1.0)
    _run_prompts(s, report, chat)  # each holds 2 full blocks: the pool is empty
    assert s.kv.num_free_blocks == 0
    out = s.schedule()  # both decode their 33rd token: each needs a third block
    assert [r.request_id for r in out.preempted] == [victim]
    survivor = chat if victim == "report" else report
    assert [r for r, _ in out.scheduled] == [survivor] and s.num_preemptions == 1
    assert s.waiting[0].request_id == victim and s.waiting[0].status == RequestStatus.PREEMPTED


# ---- the watermark --------------------------------------------------------------------------------
@pytest.mark.parametrize("watermark, admitted", [(0, True), (64, False)])
def test_admission_keeps_the_running_requests_growth_free(watermark: int, admitted: bool) -> None:
    s = _scheduler("fcfs", num_blocks=8, watermark=watermark)
    running = _request("running", 16, REPORT, max_tokens=200)
    _run_prompts(s, running)  # 1 full block held: its next 64 tokens need 4 more
    s.add(_request("new", 40, CHAT, arrival=1.0))  # needs 3 blocks
    scheduled = [r.request_id for r, _ in s.schedule().scheduled]
    assert ("new" in scheduled) == admitted
    assert s.num_admission_failures == int(not admitted)


def test_the_watermark_never_holds_back_a_request_alone() -> None:
    s = _scheduler("slo", num_blocks=4, watermark=10_000)
    s.add(_request("alone", 60, CHAT))
    assert [r.request_id for r, _ in s.schedule().scheduled] == ["alone"]


def test_predicted_ttft_counts_the_prompt_tokens_ahead_at_the_rate_steps_take_them() -> None:
    s = _scheduler("slo", num_blocks=256, budget=2048)
    assert s.predicted_ttft_s(_request("new", 100, REPORT)) is None  # no step timed yet
    s.cost.per_token_s = 0.001
    s.add(_request("queued", 500, REPORT, arrival=0.0))  # deadline 3.0
    assert s.predicted_ttft_s(_request("late", 100, REPORT, arrival=1.0)) == pytest.approx(0.6)  # 600 tokens
    # slo: a chat prompt due before the queued report goes first, so only its own tokens count
    assert s.predicted_ttft_s(_request("chat", 100, CHAT, arrival=1.0)) == pytest.approx(0.1)
    s.waiting.clear()
    _run_prompts(s, _request("report", 500, REPORT))  # it decodes from here on
    s.cost.base_s = 0.1  # a 0.25 s step (its ITL target) takes 150 prompt tokens besides its decode
    assert s.predicted_ttft_s(_request("new", 300, REPORT, arrival=1.0)) == pytest.approx(300 / 150 * 0.25)


@pytest.mark.parametrize("policy", ["fcfs", "slo"])
def test_a_request_that_finds_every_seat_taken_waits_for_running_ones_to_end_first(policy: str) -> None:
    s = Scheduler(KVCacheManager(256, BS, enable_caching=False), max_num_seqs=3, max_num_batched_tokens=2048,
                  policy=policy)
    _run_prompts(s, *(_request(f"r{i}", 20, REPORT, max_tokens=m) for i, m in enumerate((300, 101, 201))))
    s.cost.per_token_s, s.cost.decode_step_s = 0.001, 0.1
    new = _request("chat", 100, CHAT, arrival=1.0)
    assert s.predicted_ttft_s(new) == pytest.approx(100 * 0.1 + 0.1)  # r1 ends in 100 steps; then 100 tokens
    s.add(_request("queued", 100, CHAT, arrival=0.5))  # ahead of `new` in either order: two seats needed
    assert s.predicted_ttft_s(new) == pytest.approx(200 * 0.1 + 0.2)
    for report in s.running[1:]:
        s.finish(report, RequestStatus.FINISHED_STOPPED)
    assert s.predicted_ttft_s(new) == pytest.approx(0.2)  # two seats free: the queued chat's and its own

    s = _scheduler("fcfs", num_blocks=256, budget=256)
    for size in (16, 128, 512, 16, 128, 512):  # prompt-only steps: 40 ms + 2 ms per token
        s.cost.observe(0, size, 0.040 + 0.002 * size)
    assert s.cost.prompt_fixed_s == pytest.approx(0.040, abs=1e-6)
    s.add(_request("queued", 500, REPORT, arrival=0.0))
    # fcfs: the chat waits for the report; 600 tokens in steps of 256 tokens: 3 steps
    predicted = s.predicted_ttft_s(_request("chat", 100, CHAT, arrival=1.0))
    assert predicted == pytest.approx(3 * 0.040 + 600 * s.cost.per_token_s)


@pytest.mark.parametrize("policy", ["fcfs", "slo"])
def test_a_request_is_refused_for_the_load_ahead_never_for_its_own_length(policy: str) -> None:
    s = _scheduler(policy, num_blocks=256, budget=2048)
    s.cost.per_token_s = 0.001
    s.add(_request("queued", 500, REPORT, arrival=0.0))  # ahead of both below in either order
    short = _request("short", 100, REPORT, arrival=1.0)
    assert (s.alone_ttft_s(short), s.predicted_ttft_s(short)) == (pytest.approx(0.1), pytest.approx(0.6))
    with pytest.raises(OverloadedError, match=r"predicted time to first token 0.60 s is past this request's "
                                              r"limit of 0.30 s"):
        s.check_ttft(short, 0.3)
    # 400 tokens take 0.4 s on this engine idle: past the 0.3 s limit whatever the load, so a retry would not
    # help, and it is not refused (it is served, late)
    long = _request("long", 400, REPORT, arrival=1.0)
    assert s.predicted_ttft_s(long) == pytest.approx(0.9)
    s.check_ttft(long, 0.3)
    s.check_ttft(short, 0.6)  # within the limit: nothing to refuse


def test_prediction_leaves_out_what_the_prefix_cache_holds() -> None:
    kv = KVCacheManager(64, BS, enable_caching=True)
    s = Scheduler(kv, max_num_seqs=16, max_num_batched_tokens=2048, policy="slo")
    _run_prompts(s, _request("first", 8 * BS + 5, CHAT))  # its 8 full blocks are cached from here on
    s.cost.per_token_s = 0.001
    s.finish(s.running[0], RequestStatus.FINISHED_STOPPED)
    queries = kv.stats.queries
    same_prefix = _request("again", 8 * BS + 40, CHAT, arrival=1.0)
    assert s.predicted_ttft_s(same_prefix) == pytest.approx(0.040)  # its 40 new tokens only
    assert same_prefix.expected_cached_tokens == 8 * BS
    assert kv.stats.queries == queries  # a prediction is not a cache query
    s.add(same_prefix)  # queued: counted without its cached part
    assert s.num_waiting_prompt_tokens() == 40


def test_an_engine_refuses_a_request_predicted_past_its_limit_and_adds_nothing() -> None:
    engine = Engine(EngineConfig(scheduling="slo", max_num_batched_tokens=64))
    params = SamplingParams(temperature=0.0, max_tokens=4)
    engine.add_request(list(range(3, 400)), params, "first", reject_past_s=1e-9)  # nothing timed: accepted
    engine.step()  # a 64-token chunk of it: the engine now knows what a prompt token costs
    cost = engine.scheduler.cost
    limit_s = cost.prompt_fixed_s + 100 * cost.per_token_s  # 37 tokens alone fit; the 333 left of "first" do not
    free = engine.kv.num_free_blocks
    with pytest.raises(OverloadedError, match="past this request's limit"):
        engine.add_request(list(range(3, 40)), params, "late", reject_past_s=limit_s)
    assert "late" not in engine.requests and engine.kv.num_free_blocks == free
    engine.add_request(list(range(3, 40)), params, "patient", reject_past_s=3600.0)
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.kv.num_free_blocks == engine.kv.num_blocks


def test_an_engine_refuses_a_request_past_its_share_of_decode_seats_and_adds_nothing() -> None:
    engine = Engine(EngineConfig(scheduling="slo", max_num_seqs=2))
    params = SamplingParams(temperature=0.0, max_tokens=8)
    engine.add_request(list(range(3, 40)), params, "first", slo=CHAT, decode_seat_share=0.5)  # 1 of 2 seats
    while engine.scheduler.cost.decode_step_s is None:
        engine.step()
    free = engine.kv.num_free_blocks
    with pytest.raises(OverloadedError, match="requests would decode where the ITL targets and max_num_seqs "
                                              "allow"):
        engine.add_request(list(range(3, 40)), params, "late", slo=CHAT, decode_seat_share=1e-6)
    assert "late" not in engine.requests and engine.kv.num_free_blocks == free
    engine.add_request(list(range(3, 40)), params, "roomy", slo=CHAT, decode_seat_share=1.0)
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.kv.num_free_blocks == engine.kv.num_blocks


def test_slo_targets_are_validated() -> None:
    for bad in ({"ttft_s": 0, "itl_s": 0.1}, {"ttft_s": 1.0, "itl_s": float("nan")}, {"ttft_s": -1, "itl_s": 1}):
        with pytest.raises(ValueError):
            SLO(**bad)


# ---- the engine -----------------------------------------------------------------------------------
def test_the_slo_policy_changes_the_order_not_the_tokens() -> None:
    """Greedy outputs are the same under both policies with a watermark, chunking and preemption in play."""
    prompts = random_prompts([300, 20, 150, 40, 90], 8192, seed=5)
    slos = [REPORT, CHAT, REPORT, CHAT, None]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    outputs = {}
    for policy in ("fcfs", "slo"):
        engine = Engine(EngineConfig(scheduling=policy, kv_watermark_tokens=16 if policy == "slo" else 0,
                                     num_kv_blocks=48, max_num_batched_tokens=128))
        reqs = [engine.add_request(p, params, slo=slo) for p, slo in zip(prompts, slos, strict=True)]
        while engine.has_unfinished_requests():
            engine.step()
        outputs[policy] = [r.output_token_ids for r in reqs]
        assert engine.kv.num_free_blocks == engine.kv.num_blocks
        assert engine.scheduler.cost.per_token_s is not None  # the engine reported its steps
    assert outputs["slo"] == outputs["fcfs"]

"""bench/workload.py's chat mix: determinism, distributions, exact token lengths, arrivals, scale."""

from __future__ import annotations

import itertools
import math
import statistics

import pytest

from bench.prompt_text import builtin_tokenizer, chat_prompt_len, model_tokenizer
from bench.workload import (
    CHAT_OUTPUTS,
    REPORT_GEN,
    SUPPORT_CHAT,
    ChatMix,
    Concurrency,
    Poisson,
    ProductMix,
    chat_requests,
    default_mix,
)


@pytest.fixture(scope="module")
def tok():
    return builtin_tokenizer()


def take(n, mix, arrival, seed, tok):
    return list(itertools.islice(chat_requests(mix, arrival, seed, tok), n))


def small_mix(weights=(1.0, 1.0), user_tokens=(2, 8), scale=1.0) -> ChatMix:
    """Short prompts: for tests of the shape of the stream, not of long texts."""
    return ChatMix(products=(ProductMix("a", weights[0], "You are terse.", (1, 3)),
                             ProductMix("b", weights[1], "You write reports.", (10, 20))),
                   user_tokens=user_tokens, scale=scale)


def test_same_seed_same_requests_different_seed_different(tok) -> None:
    mix = default_mix()
    a, b = take(40, mix, Poisson(2.0), 7, tok), take(40, mix, Poisson(2.0), 7, tok)
    c = take(40, mix, Poisson(2.0), 8, tok)
    assert a == b
    assert [r.user for r in a] != [r.user for r in c]
    assert [r.user_tokens for r in a] != [r.user_tokens for r in c]
    assert [r.product for r in a] != [r.product for r in c]
    assert [r.arrival_s for r in a] != [r.arrival_s for r in c]


def test_requests_do_not_depend_on_arrival_process(tok) -> None:
    """The same requests drive every load level: only arrival times differ."""
    mix = small_mix()
    slow, fast, closed = (take(50, mix, arrival, 3, tok) for arrival in (Poisson(1.0), Poisson(9.0), Concurrency(4)))
    strip = [(r.request_id, r.product, r.user, r.max_tokens) for r in slow]
    assert strip == [(r.request_id, r.product, r.user, r.max_tokens) for r in fast]
    assert strip == [(r.request_id, r.product, r.user, r.max_tokens) for r in closed]
    assert all(r.arrival_s is None for r in closed)  # closed loop: the client paces them
    assert all(s.arrival_s > f.arrival_s for s, f in zip(slow, fast, strict=True))


def test_prompts_tokenize_to_their_stated_lengths(tok) -> None:
    for r in take(30, default_mix(), Poisson(1.0), 11, tok):
        assert len(tok.encode(r.user, add_special_tokens=False)) == r.user_tokens
        assert chat_prompt_len(tok, r.system, r.user) == r.prompt_tokens


@pytest.mark.parametrize("model", ["tiny", "smollm2-135m-instruct"])
def test_every_request_starts_with_its_products_shared_system_prompt(model: str) -> None:
    tok = model_tokenizer(model)
    mix = default_mix()
    reqs = take(60, mix, Poisson(1.0), 5, tok)
    systems = {p.name: p.system_prompt for p in mix.products}
    assert systems[SUPPORT_CHAT] == systems[REPORT_GEN]  # one system prompt for both products
    system_tokens = len(tok.apply_chat_template([{"role": "system", "content": systems[SUPPORT_CHAT]}],
                                                tokenize=True, return_dict=False))
    if model == "smollm2-135m-instruct":  # the served model: the shared ~220-token system prompt
        assert 200 <= system_tokens <= 240
    ids = [tok.apply_chat_template(r.messages(), tokenize=True, return_dict=False) for r in reqs]
    assert {tuple(i[:system_tokens]) for i in ids} == {tuple(ids[0][:system_tokens])}
    assert reqs[0].messages(include_system=False) == [{"role": "user", "content": reqs[0].user}]
    assert reqs[0].messages()[0] == {"role": "system", "content": systems[reqs[0].product]}


def test_product_ratio_follows_the_weights(tok) -> None:
    reqs = take(4000, small_mix(weights=(3.0, 1.0)), Concurrency(1), 0, tok)
    share = sum(r.product == "a" for r in reqs) / len(reqs)
    assert abs(share - 0.75) < 0.03  # binomial std ~0.007
    default = take(2000, default_mix(), Concurrency(1), 0, tok)
    assert abs(sum(r.product == SUPPORT_CHAT for r in default) / 2000 - 0.5) < 0.04


def test_user_prompt_lengths_are_log_uniform_in_range(tok) -> None:
    mix = ChatMix(products=(ProductMix("a", 1.0, "", (1, 1)),), user_tokens=(20, 2000))
    n = [r.user_tokens for r in take(3000, mix, Concurrency(1), 1, tok)]
    assert 20 <= min(n) < 25 and 1700 < max(n) <= 2000
    # log-uniform on [20, 2001): each decade-ish half, [20, 200) and [200, 2000], gets about half
    split = math.sqrt(20 * 2001)
    assert abs(sum(x < split for x in n) / len(n) - 0.5) < 0.04
    # and the log-lengths are spread evenly: their quartiles sit at 1/4, 1/2, 3/4 of the log range
    lo, hi = math.log(20), math.log(2001)
    for q, expected in zip(statistics.quantiles([math.log(x) for x in n], n=4), (0.25, 0.5, 0.75), strict=True):
        assert abs((q - lo) / (hi - lo) - expected) < 0.04


def test_output_lengths_are_about_the_products_targets(tok) -> None:
    reqs = take(2000, default_mix(), Concurrency(1), 2, tok)
    for product, target in ((SUPPORT_CHAT, 50), (REPORT_GEN, 1500)):
        out = [r.max_tokens for r in reqs if r.product == product]
        assert set(out) <= set(range(CHAT_OUTPUTS[product][0], CHAT_OUTPUTS[product][1] + 1))
        assert abs(statistics.mean(out) - target) / target < 0.02


def test_poisson_arrivals_have_exponential_gaps(tok) -> None:
    rate = 4.0
    times = [r.arrival_s for r in take(5000, small_mix(), Poisson(rate), 9, tok)]
    gaps = [b - a for a, b in zip([0.0, *times], times, strict=False)]
    assert all(g > 0 for g in gaps)
    assert abs(statistics.mean(gaps) - 1 / rate) / (1 / rate) < 0.05  # std of the mean ~1.4%
    # exponential: std equals the mean (fixed spacing would give 0); P(gap > mean) = 1/e
    assert abs(statistics.pstdev(gaps) / statistics.mean(gaps) - 1.0) < 0.08
    assert abs(sum(g > 1 / rate for g in gaps) / len(gaps) - math.exp(-1)) < 0.03


def test_scale_shrinks_lengths_and_keeps_the_shape(tok) -> None:
    full = take(400, default_mix(scale=1.0), Poisson(2.0), 4, tok)
    tenth = take(400, default_mix(scale=0.1), Poisson(2.0), 4, tok)
    assert [r.product for r in full] == [r.product for r in tenth]
    assert [r.arrival_s for r in full] == [r.arrival_s for r in tenth]
    assert all(2 <= r.user_tokens <= 200 for r in tenth)
    for product, (lo, hi) in CHAT_OUTPUTS.items():
        out = [r.max_tokens for r in tenth if r.product == product]
        assert set(out) <= set(range(round(lo * 0.1), round(hi * 0.1) + 1))
    ratio = statistics.mean(r.user_tokens for r in tenth) / statistics.mean(r.user_tokens for r in full)
    assert 0.08 < ratio < 0.12
    assert {r.system for r in tenth} == {r.system for r in full}  # the servers' prompts are not scaled


def test_invalid_arguments_are_refused() -> None:
    with pytest.raises(ValueError):
        Poisson(0.0)
    with pytest.raises(ValueError):
        Concurrency(0)
    with pytest.raises(ValueError):
        default_mix(weights={"no-such-product": 1.0})
    with pytest.raises(ValueError):
        ChatMix(products=(ProductMix("a", 0.0, "", (1, 2)),))
    with pytest.raises(ValueError):
        small_mix(scale=0.0)

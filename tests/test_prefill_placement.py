"""Where a prompt is computed (decode_workers/prefill_placement.py): here when its uncached part is short and
cheaper here than the remote path's measured fixed cost, on a prefill worker otherwise."""

from __future__ import annotations

import pytest

from decode_workers.prefill_placement import PrefillPlacement


def test_the_size_bound_alone_decides_until_both_costs_are_known() -> None:
    placement = PrefillPlacement(max_local_tokens=64)
    assert placement.here(64, local_token_s=None) and not placement.here(65, local_token_s=None)
    assert placement.here(64, local_token_s=1.0)  # the remote path's cost is not known yet
    assert not PrefillPlacement(max_local_tokens=0).here(1, local_token_s=1e-9)  # local prefills off


def test_a_short_prompt_stays_here_only_while_it_costs_less_than_the_remote_overhead() -> None:
    placement = PrefillPlacement(max_local_tokens=512)
    placement.observe_remote(call_s=0.050, prefill_s=0.030, fetch_s=0.010)  # overhead 20 ms + 10 ms
    assert placement.overhead_s == pytest.approx(0.030)
    assert placement.here(30, local_token_s=0.001)  # 30 ms here against 30 ms of overhead
    assert not placement.here(31, local_token_s=0.001)
    assert not placement.here(600, local_token_s=1e-6)  # over the size bound, however cheap
    placement.observe_remote(call_s=0.020, prefill_s=0.030, fetch_s=0.0)  # clock skew: never negative
    assert placement.overhead_s == pytest.approx(0.8 * 0.030)


def test_a_negative_bound_is_refused() -> None:
    with pytest.raises(ValueError):
        PrefillPlacement(max_local_tokens=-1)

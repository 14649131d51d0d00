"""bench/engine_slo.py: one engine under the two-product mix in real time. A short run on the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.engine_slo import SYSTEM_PROMPT_TOKENS, Outcome, main, workload
from bench.workload import default_mix


def test_the_workload_is_seeded_and_shares_the_system_prompt() -> None:
    mix = default_mix(scale=0.25)
    first, again = workload(mix, 2.0, 5.0, 0, 1000), workload(mix, 2.0, 5.0, 0, 1000)
    assert [ids for _, ids in first] == [ids for _, ids in again]
    assert first and all(req.arrival_s <= 5.0 for req, _ in first)
    system = first[0][1][:SYSTEM_PROMPT_TOKENS]
    assert all(ids[:SYSTEM_PROMPT_TOKENS] == system for _, ids in first)
    assert all(len(ids) == SYSTEM_PROMPT_TOKENS + req.user_tokens for req, ids in first)
    assert [ids for _, ids in workload(mix, 2.0, 5.0, 1, 1000)] != [ids for _, ids in first]


def test_a_short_run_ends_every_request_for_each_policy(tmp_path: Path) -> None:
    assert main(["--model", "tiny", "--dtype", "float32", "--rate", "3", "--duration", "2", "--policies",
                 "fcfs,slo", "--report-seat-share", "0.8", "--out", str(tmp_path)]) == 0
    sent = len(workload(default_mix(scale=0.25), 3.0, 2.0, 0, 1000))
    for policy in ("fcfs", "slo"):
        outcomes = [Outcome(**json.loads(line)) for line in (tmp_path / f"{policy}.jsonl").read_text().splitlines()]
        assert len(outcomes) == sent  # every request served or refused, none left behind
        for o in outcomes:
            assert o.refused or (o.ttft_s is not None and o.ttft_s >= 0 and o.finish_s >= o.first_token_s)
        steps = [json.loads(line) for line in (tmp_path / f"{policy}-steps.jsonl").read_text().splitlines()]
        assert steps and all(s["seconds"] > 0 for s in steps)
        assert sum(s["prompt_tokens"] for s in steps) > 0


def test_a_run_stops_by_itself_at_the_drain_bound(tmp_path: Path) -> None:
    """Whatever still runs when the drain ends is aborted and counted as missed. Seed 0 at 4 req/s sends a
    376-token report 2.75 s in: it cannot end by 3 s."""
    assert main(["--model", "tiny", "--dtype", "float32", "--rate", "4", "--duration", "3", "--drain", "0",
                 "--policies", "slo", "--out", str(tmp_path)]) == 0
    outcomes = [Outcome(**json.loads(line)) for line in (tmp_path / "slo.jsonl").read_text().splitlines()]
    assert len(outcomes) == len(workload(default_mix(scale=0.25), 4.0, 3.0, 0, 1000))
    aborted = [o for o in outcomes if o.finish_s is None and not o.refused]
    assert any(o.product == "report-gen" for o in aborted)
    assert not any(o.met() for o in aborted)


@pytest.mark.parametrize("share", ["0", "1.5"])
def test_a_seat_share_outside_its_range_is_refused_before_anything_runs(share: str) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--model", "tiny", "--report-seat-share", share])
    assert exc.value.code == 2

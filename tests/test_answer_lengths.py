"""bench/answer_lengths.py: each product's real questions through its system prompt, EOS honoured."""

from __future__ import annotations

from bench import answer_lengths


def test_quick_run_reports_every_product_and_setting(capsys) -> None:
    rows = answer_lengths.run("tiny", {name: 8 for name in answer_lengths.QUESTIONS}, threads=1)
    assert {(r["product"], r["setting"]) for r in rows} == {
        (p, s) for p in answer_lengths.QUESTIONS for s in answer_lengths.SETTINGS}
    for row in rows:
        assert row["answers"] == 8 and 1 <= row["median"] <= row["p90"] <= 8 and 0 <= row["ended_on_eos"] <= 8
    assert answer_lengths.main(["--model", "tiny", "--quick", "--threads", "1"]) == 0
    assert "| support-chat | greedy | 8 | 8 |" in capsys.readouterr().out

"""bench/: the workload generator's contract, and the offline throughput benchmark's --quick run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.workload import WorkloadRequest, offline_mix

ROOT = Path(__file__).resolve().parent.parent
VOCAB = 8192


def test_same_seed_same_requests() -> None:
    assert offline_mix(64, seed=7, vocab_size=VOCAB) == offline_mix(64, seed=7, vocab_size=VOCAB)


def test_different_seeds_differ() -> None:
    a, b = offline_mix(64, seed=1, vocab_size=VOCAB), offline_mix(64, seed=2, vocab_size=VOCAB)
    assert [r.prompt_token_ids for r in a] != [r.prompt_token_ids for r in b]
    assert [r.prompt_len for r in a] != [r.prompt_len for r in b]


def test_shape_of_the_mix() -> None:
    reqs = offline_mix(64, seed=0, vocab_size=VOCAB)
    assert len(reqs) == 64 and all(isinstance(r, WorkloadRequest) for r in reqs)
    assert len({r.request_id for r in reqs}) == 64
    system = reqs[0].prompt_token_ids[:220]
    assert len(system) == 220
    for r in reqs:
        assert r.prompt_token_ids[:220] == system  # one shared system prompt
        assert 20 <= r.prompt_len - 220 <= 2000
        assert all(3 <= t < VOCAB for t in r.prompt_token_ids)
        assert r.max_tokens == {"support-chat": 50, "report-gen": 300}[r.product]
    products = [r.product for r in reqs]
    assert products.count("support-chat") == products.count("report-gen") == 32
    assert products[:32].count("support-chat") not in (0, 32)  # shuffled, not in blocks
    user = sorted(r.prompt_len - 220 for r in reqs)
    assert user[0] < 100 and user[-1] > 1000  # spread over the range (log-uniform: median ~200)
    # user prompts differ from each other right after the system prompt
    assert len({r.prompt_token_ids[220:230] for r in reqs}) == 64


def test_mix_is_about_even_for_any_seed_and_count() -> None:
    for seed in range(5):
        for n in (1, 7, 100):
            products = [r.product for r in offline_mix(n, seed=seed, vocab_size=100)]
            assert abs(products.count("support-chat") - products.count("report-gen")) <= 1


def test_bounds_and_scale() -> None:
    reqs = offline_mix(200, seed=3, vocab_size=50, system_prompt_tokens=10, user_tokens=(5, 9),
                       outputs={"a": 3, "b": 4})
    assert all(5 <= r.prompt_len - 10 <= 9 for r in reqs)
    assert {r.prompt_len - 10 for r in reqs} == set(range(5, 10))  # both ends reachable
    assert all(3 <= t < 50 for r in reqs for t in r.prompt_token_ids)
    small = offline_mix(64, seed=0, vocab_size=VOCAB, scale=0.1)
    assert all(r.prompt_token_ids[:22] == small[0].prompt_token_ids[:22] for r in small)
    assert all(2 <= r.prompt_len - 22 <= 200 for r in small)
    assert {r.max_tokens for r in small} == {5, 30}
    with pytest.raises(ValueError):
        offline_mix(4, seed=0, vocab_size=3)
    with pytest.raises(ValueError):
        offline_mix(4, seed=0, vocab_size=VOCAB, scale=0)


def test_hf_batches_sorted_minimise_padding() -> None:
    from bench.offline_throughput import hf_batches

    reqs = offline_mix(40, seed=0, vocab_size=VOCAB)
    arrival, ordered = hf_batches(reqs, 16, sort=False), hf_batches(reqs, 16, sort=True)
    assert [len(b) for b in arrival] == [len(b) for b in ordered] == [16, 16, 8]
    assert sum(arrival, []) == list(range(40)) and sorted(sum(ordered, [])) == list(range(40))
    keys = [(reqs[i].max_tokens, reqs[i].prompt_len) for i in sum(ordered, [])]
    assert keys == sorted(keys)


@pytest.mark.timeout(180)
def test_quick_benchmark_runs(tmp_path: Path) -> None:
    out_json, out_md = tmp_path / "offline.json", tmp_path / "section.md"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.offline_throughput", "--quick", "--json", str(out_json), "--out", str(out_md)],
        cwd=ROOT, capture_output=True, text=True, timeout=170, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out_json.read_text())
    assert report["check"]["ok"], report["check"]
    summary = report["summary"]
    assert set(summary) == {"pdserve", "hf-arrival", "hf-sorted"}
    for s in summary.values():
        assert s["output_tok_s_median"] > 0 and s["peak_rss_mib_max"] > 0
        assert s["output_tokens"] == report["meta"]["output_tokens"]
    assert summary["hf-sorted"]["ratio_pdserve_over_this"] > 0
    assert report["agreement"]["deterministic_across_repeats"]["pdserve"]
    assert "| pdserve" in proc.stdout and "pdserve" in out_md.read_text()


def test_a_dtype_sizes_the_budget_and_reaches_every_child() -> None:
    from bench.offline_throughput import _child_argv, _kv_bytes, kv_bytes_per_token, parse_args

    cfg = {"num_attention_heads": 16, "hidden_size": 2048, "num_hidden_layers": 16, "num_key_value_heads": 16,
           "vocab_size": VOCAB}
    reqs = offline_mix(16, seed=0, vocab_size=VOCAB)
    f32, bf16 = parse_args(["--requests", "16"]), parse_args(["--requests", "16", "--dtype", "bfloat16"])
    assert kv_bytes_per_token(cfg, 2) * 2 == kv_bytes_per_token(cfg, 4)
    # the same tokens in half the bytes, each rounded up to 64 MiB
    assert abs(2 * _kv_bytes(bf16, reqs, cfg) - _kv_bytes(f32, reqs, cfg)) <= 2 * 64 * 2**20
    assert _kv_bytes(f32, reqs, cfg) > 1 << 30
    argv = _child_argv(bf16, "pdserve", "/tmp/result.json")
    assert argv[argv.index("--dtype") + 1] == "bfloat16"
    assert parse_args(argv[3:]).dtype == "bfloat16"  # what the child parses back

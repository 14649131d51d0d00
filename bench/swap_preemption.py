"""Preemption by swap-out against preemption by recompute, on the real engine, side by side.

One engine per variant (the `small` model by default, a KV pool far smaller than the batch needs, prefix
caching off so a preempted request's blocks cannot come back from the cache), the same seeded batch of
prompts and long answers, all queued at once; each variant runs the batch to the end. Reported per variant,
medians over repeats (variants alternate within a repeat): wall seconds, output tokens/s, prompt tokens
computed (recompute shows up here), preemptions and swap-outs, and the inter-token gaps every request saw
(P50 and P99 over all gaps; a recompute preemption is a long gap for its victim).

    python -m bench.swap_preemption [--repeats 3] [--requests 24] [--model small] [--kv-blocks 160]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

from engine.config import EngineConfig, SamplingParams
from engine.engine import Engine
from engine.models import resolve as model_path

GiB = 1 << 30
VARIANTS = {"recompute": 0, "swap": 4 * GiB}  # swap_space_bytes


def run_once(model: str, swap_space_bytes: int, prompts: list[list[int]], max_tokens: int,
             kv_blocks: int) -> dict[str, float]:
    engine = Engine(EngineConfig(model=model_path(model), num_kv_blocks=kv_blocks, enable_prefix_caching=False,
                                 max_num_seqs=16, swap_space_bytes=swap_space_bytes, num_threads=2))
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    reqs = [engine.add_request(p, params) for p in prompts]
    seen = [0] * len(reqs)
    last = [None] * len(reqs)
    gaps: list[float] = []
    started = time.perf_counter()
    while engine.scheduler.has_unfinished():
        engine.step()
        now = time.perf_counter()
        for i, req in enumerate(reqs):
            if req.num_output_tokens > seen[i]:
                if last[i] is not None:
                    gaps.append(now - last[i])
                seen[i], last[i] = req.num_output_tokens, now
    wall = time.perf_counter() - started
    stats = engine.stats()
    gaps.sort()
    return {"wall_s": wall, "tokens_per_s": sum(seen) / wall, "prompt_tokens_computed": stats.prompt_tokens_computed,
            "preemptions": stats.num_preemptions, "swap_outs": stats.num_swap_outs,
            "itl_p50_ms": gaps[len(gaps) // 2] * 1e3, "itl_p99_ms": gaps[int(len(gaps) * 0.99)] * 1e3}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="small")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--requests", type=int, default=24)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--kv-blocks", type=int, default=160, help="KV blocks of 16 tokens per engine")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    lengths = [rng.randint(100, 500) for _ in range(args.requests)]
    prompts = [[rng.randint(3, 8000) for _ in range(n)] for n in lengths]  # ids inside every built-in vocabulary
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in VARIANTS}
    for repeat in range(args.repeats):
        order = list(VARIANTS) if repeat % 2 == 0 else list(reversed(VARIANTS))
        for name in order:
            runs[name].append(run_once(args.model, VARIANTS[name], prompts, args.max_tokens, args.kv_blocks))
    medians = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in runs.items()}
    ratio = statistics.median(s["tokens_per_s"] / r["tokens_per_s"]
                              for s, r in zip(runs["swap"], runs["recompute"], strict=True))
    print(json.dumps({"args": vars(args), "prompt_tokens": sum(lengths), "medians": medians,
                      "swap_over_recompute_tokens_per_s_paired": ratio}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

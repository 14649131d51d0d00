"""Micro-benchmark: decode attention with one padded bucket vs length buckets.

One layer of the `small` built-in model's shape (12 query heads, 4 KV heads,
head_dim 64, fp32, block size 16) on the context lengths of the offline
benchmark's 64 requests at a given decode step (prompt + tokens generated so
far). Times `decode_attention_bucketed` for each bucket cost in
`--costs` (`inf` = one bucket, the previous behaviour) and checks every
variant returns the same output as one bucket.

    python -m bench.decode_buckets --step 150 --repeats 20
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import torch

from bench.workload import offline_mix
from engine.attention import decode_attention_bucketed, plan_decode_buckets


def context_lengths(num_requests: int, step: int) -> list[int]:
    """Sorted context lengths (tokens) of the requests still decoding at `step`."""
    mix = offline_mix(num_requests, seed=0, vocab_size=8192)
    return sorted(r.prompt_len + step for r in mix if r.max_tokens > step)


def run(lengths: list[int], costs: list[float], repeats: int, block_size: int = 16) -> dict:
    torch.manual_seed(0)
    heads, kv_heads, dim = 12, 4, 64
    blocks_per_seq = [-(-n // block_size) for n in lengths]
    num_blocks = sum(blocks_per_seq) + 1
    k_cache = torch.randn(num_blocks, block_size, kv_heads, dim)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, dim)
    tables = torch.zeros(len(lengths), max(blocks_per_seq), dtype=torch.long)
    next_block = 1
    for i, nb in enumerate(blocks_per_seq):
        tables[i, :nb] = torch.arange(next_block, next_block + nb)
        next_block += nb
    seq_lens = torch.tensor(lengths)
    query = torch.randn(len(lengths), heads, dim)
    scale = dim ** -0.5
    workspace: dict = {}
    reference = decode_attention_bucketed(query, k_cache, v_cache, tables, seq_lens, scale, None, workspace, None)
    results = {}
    for cost in costs:
        buckets = None if math.isinf(cost) else plan_decode_buckets(lengths, block_size, int(cost))
        out = decode_attention_bucketed(query, k_cache, v_cache, tables, seq_lens, scale, None, workspace, buckets)
        max_diff = float((out - reference).abs().max())
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            decode_attention_bucketed(query, k_cache, v_cache, tables, seq_lens, scale, None, workspace, buckets)
            times.append(time.perf_counter() - t0)
        results[str(cost)] = {"buckets": len(buckets) if buckets else 1, "median_ms": statistics.median(times) * 1e3,
                              "max_abs_diff": max_diff}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--step", type=int, action="append", help="decode step(s); default 10, 150")
    parser.add_argument("--costs", default="inf,0,64,256,1024,4096")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    costs = [float(c) for c in args.costs.split(",")]
    report = {}
    for step in args.step or [10, 150]:
        lengths = context_lengths(args.requests, step)
        report[step] = {"rows": len(lengths), "padding_x": max(lengths) * len(lengths) / sum(lengths),
                        "results": run(lengths, costs, args.repeats)}
        base = report[step]["results"][str(math.inf)]["median_ms"]
        print(f"step {step}: {len(lengths)} decodes, one bucket pads {report[step]['padding_x']:.2f}x")
        for cost, r in report[step]["results"].items():
            print(f"  cost {cost:>6}: {r['buckets']:3d} buckets {r['median_ms']:8.2f} ms/layer "
                  f"speedup {base / r['median_ms']:5.2f}x  max|diff| {r['max_abs_diff']:.1e}")
    print(json.dumps(report))


if __name__ == "__main__":
    main()

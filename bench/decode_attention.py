"""Micro-benchmark: the C paged decode attention kernel, one layer of the `small` model.

12 query heads, 4 KV heads, head_dim 64, block size 16, float32 or bfloat16 caches (`--dtypes`); `--batch`
sequences whose blocks are scattered over a pool of `--pool-blocks` blocks,
each call made with cold caches (a 64 MB buffer is written in between, as a
decode step's weights pass through the caches between two layers' attention).
Reports the median microseconds per call per cache dtype, context length and thread
count, and checks the kernel against the torch path (in float32, on the same values).

    python -m bench.decode_attention --contexts 150,350,1000 --threads 1,2 --dtypes float32,bfloat16 --repeats 300
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from engine import cpu_attention
from engine.attention import decode_attention_torch

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 12, 4, 64, 16


def _batch(batch: int, context: int, pool_blocks: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    lens = [max(1, context + 20 * (i - batch // 2)) for i in range(batch)]
    width = -(-max(lens) // BLOCK)
    if batch * width > pool_blocks:
        raise SystemExit(f"--pool-blocks {pool_blocks} cannot hold {batch} x {width} blocks")
    k = torch.randn(pool_blocks, BLOCK, KV_HEADS, HEAD_DIM, generator=g)
    v = torch.randn(pool_blocks, BLOCK, KV_HEADS, HEAD_DIM, generator=g)
    table = torch.randperm(pool_blocks, generator=g)[: batch * width].view(batch, width).contiguous()
    q = torch.randn(batch, HEADS, HEAD_DIM, generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype), table, torch.tensor(sorted(lens))


def median_us(batch: int, context: int, pool_blocks: int, threads: int, repeats: int,
              dtype: torch.dtype = torch.float32) -> float:
    q, k, v, table, lens = _batch(batch, context, pool_blocks, dtype)
    expected = decode_attention_torch(q.float(), k.float(), v.float(), table, lens, HEAD_DIM**-0.5)
    got = cpu_attention.paged_decode_attention(q, k, v, table, lens, HEAD_DIM**-0.5)
    tol = 1e-5 if dtype == torch.float32 else 2**-8  # bfloat16: the output is rounded once
    torch.testing.assert_close(got.float(), expected, rtol=tol, atol=1e-5)
    evict = torch.empty(16_000_000)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        times = []
        for _ in range(repeats):
            evict.fill_(1.0)
            start = time.perf_counter()
            cpu_attention.paged_decode_attention(q, k, v, table, lens, HEAD_DIM**-0.5)
            times.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(previous)
    return statistics.median(times) * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--contexts", default="150,350,1000", help="context lengths (tokens), comma-separated")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--dtypes", default="float32", help="cache dtypes: float32, bfloat16, comma-separated")
    parser.add_argument("--pool-blocks", type=int, default=4000)
    parser.add_argument("--repeats", type=int, default=300)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if not cpu_attention.available():
        raise SystemExit("the C kernel is not available on this machine (no C compiler?)")
    rows = [{"dtype": d, "context": c, "threads": t,
             "us": median_us(args.batch, c, args.pool_blocks, t, args.repeats, getattr(torch, d))}
            for d in args.dtypes.split(",") for c in map(int, args.contexts.split(","))
            for t in map(int, args.threads.split(","))]
    print(f"| context (tokens) | threads | cache | us per call ({args.batch} sequences, one layer) |\n"
          "|---:|---:|---|---:|")
    for r in rows:
        print(f"| {r['context']} | {r['threads']} | {r['dtype']} | {r['us']:.1f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

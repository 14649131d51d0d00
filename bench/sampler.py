"""Micro-benchmark: the batched sampler (engine/sampler.py) against the per-row reference it replaced
(bench/sampler_reference.py), on the CPU.

Each batch mixes parameters row by row, cycling through: greedy; temperature 0.7; temperature 0.9 with
top_p 0.95; temperature 1.0 with top_k 50; temperature 0.8 with top_k 40, top_p 0.9 and a seed;
temperature 1.0 with top_p 0.9 and logprobs 5. Logits are random normal (scale 3), float32,
[rows, vocab]. Reports the median milliseconds per call over --repeats calls (after warm-up calls) for
each sampler and their ratio (reference / batched: above 1 means the batched one is faster).

    python -m bench.sampler --rows 32,64 --vocab 49152 --repeats 30
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from bench.sampler_reference import ReferenceSampler
from engine.config import SamplingParams
from engine.request import Request
from engine.sampler import Sampler

MIX = (
    SamplingParams(temperature=0.0),
    SamplingParams(temperature=0.7),
    SamplingParams(temperature=0.9, top_p=0.95),
    SamplingParams(temperature=1.0, top_k=50),
    SamplingParams(temperature=0.8, top_k=40, top_p=0.9, seed=7),
    SamplingParams(temperature=1.0, top_p=0.9, logprobs=5),
)


def _requests(rows: int) -> list[Request]:
    return [Request(f"bench-{i}", [1], MIX[i % len(MIX)], b"", 1 << 20) for i in range(rows)]


def median_ms(sample: Callable[[torch.Tensor, list[Request]], object], rows: int, vocab: int,
              repeats: int, warmup: int = 3) -> float:
    logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(rows)) * 3
    requests = _requests(rows)
    for _ in range(warmup):
        sample(logits, requests)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        sample(logits, requests)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="32,64", help="batch sizes (sequences), comma-separated")
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"vocab {args.vocab}, {torch.get_num_threads()} threads, median of {args.repeats} calls")
    print("| rows | per-row reference (ms) | batched (ms) | reference / batched |\n|---:|---:|---:|---:|")
    for rows in map(int, args.rows.split(",")):
        reference = median_ms(ReferenceSampler(0), rows, args.vocab, args.repeats)
        batched = median_ms(Sampler(0), rows, args.vocab, args.repeats)
        print(f"| {rows} | {reference:.2f} | {batched:.2f} | {reference / batched:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

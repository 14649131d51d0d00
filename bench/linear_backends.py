"""Micro-benchmark: torch's nn.Linear (MKL) vs oneDNN over packed weights, per row count.

The `small` built-in model's projection shapes (out x in), each repeated until
the set is ~100M floats (~400 MB, far past the last-level cache, as a decode
step's weights are), timed at row counts from decoding (1 to 16 sequences) to
prefill chunks (256 tokens), with 1 and 2 torch threads. Reports weight
bandwidth (GB/s of weights read per second) per backend and their ratio, and
checks both give the same result.

    python -m bench.linear_backends --repeats 7
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from engine.cpu_linear import PackedLinear

SHAPES = ((2560, 768), (768, 2560), (5120, 768), (1280, 768))  # up/gate, down, gate+up fused, q+k+v sized
ROWS = (1, 4, 16, 64, 256)
TARGET_FLOATS = 100_000_000


def _median_seconds(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run(threads: int, repeats: int) -> list[dict]:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    return [row for out_f, in_f in SHAPES for row in _time_shape(out_f, in_f, threads, repeats)]


def _time_shape(out_f: int, in_f: int, threads: int, repeats: int) -> list[dict]:
    count = max(1, TARGET_FLOATS // (out_f * in_f))
    weights = [torch.randn(out_f, in_f) for _ in range(count)]
    packed = [PackedLinear(w, None) for w in weights]
    nbytes = count * out_f * in_f * 4
    rows = []
    for m in ROWS:
        x = torch.randn(m, in_f)
        # sums of in_f products of unit normals (magnitude ~sqrt(in_f)): float32 rounding, not a mismatch
        torch.testing.assert_close(packed[0](x), F.linear(x, weights[0]), rtol=1e-4, atol=1e-3)
        t_mkl = _median_seconds(lambda: [F.linear(x, w) for w in weights], repeats)  # noqa: B023
        t_dnn = _median_seconds(lambda: [p(x) for p in packed], repeats)  # noqa: B023
        rows.append({"threads": threads, "shape": f"{out_f}x{in_f}", "rows": m,
                     "mkl_gb_s": nbytes / t_mkl / 1e9, "onednn_gb_s": nbytes / t_dnn / 1e9, "speedup": t_mkl / t_dnn})
    return rows


def markdown(results: list[dict]) -> str:
    lines = ["| threads | weight (out x in) | rows | nn.Linear (MKL) GB/s | oneDNN packed GB/s | speedup |",
             "|---:|---|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['threads']} | {r['shape']} | {r['rows']} | {r['mkl_gb_s']:.1f} | {r['onednn_gb_s']:.1f} "
                     f"| {r['speedup']:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", default="1,2", help="comma-separated torch thread counts")
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args()
    results = [r for t in args.threads.split(",") for r in run(int(t), args.repeats)]
    print(markdown(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()

"""Micro-benchmark: one engine's decode step time, alone and beside bursty co-runners.

A serving replica shares its cores with the processes around it (the HTTP
proxy, the ingress, Ray's own threads, the load client), which wake up for a
moment per token. This measures what such neighbours cost the engine: the
`small` model decoding `--seqs` sequences (`--prompt-len` random tokens each,
greedy), median milliseconds per pure decode step over `--steps` steps, alone and
while `--co-runners` processes each spin for `--busy-ms` then
sleep for `--idle-ms` (bounded: they stop with the measurement).

    python -m bench.decode_step --threads 1,2 --seqs 4 --co-runners 2
    python -m bench.decode_step --threads 2 --co-runner-nice 19    # neighbours at low priority
    python -m bench.decode_step --threads 2 --co-runners 0 --step-on-other-thread
    python -m bench.decode_step --threads 2 --co-runners 0 --side-thread-copy
    python -m bench.decode_step --threads 1,2 --seqs 16 --prompt-len 600 --co-runners 0 --dtypes float32,bfloat16
"""

from __future__ import annotations

import argparse
import concurrent.futures
import multiprocessing as mp
import os
import random
import statistics
import time

import torch

from engine import LLM, SamplingParams
from engine.models import resolve as model_path


def _co_runner(busy_s: float, idle_s: float, nice: int, sched_idle: bool, stop: mp.Event) -> None:
    os.nice(nice)  # raising one's own niceness needs no privilege
    if sched_idle:  # runs only on a core nothing else wants; never preempts the engine
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    while not stop.is_set():
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < busy_s:
            pass
        time.sleep(idle_s)


def step_times_ms(llm: LLM, seqs: int, prompt_len: int, steps: int) -> list[float]:
    """Times of `steps` decode steps of `seqs` sequences (after their prefill), in milliseconds."""
    rng = random.Random(0)
    vocab = llm.engine.vocab_size
    params = SamplingParams(temperature=0.0, max_tokens=steps + 8, ignore_eos=True)
    engine = llm.engine
    for _ in range(seqs):
        engine.add_request([rng.randrange(3, vocab) for _ in range(prompt_len)], params)
    while any(r.num_output_tokens == 0 for r in engine.requests.values()):  # prefill (chunked or not)
        engine.step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        engine.step()
        times.append((time.perf_counter() - t0) * 1000)
    for rid in list(engine.requests):
        engine.abort_request(rid)
    engine.step()
    return times


def _large_copy() -> None:
    src = torch.ones(20_000_000)  # 80 MB: far above torch's grain size, so the copy runs in parallel
    torch.empty_like(src).copy_(src)


def measure(threads: int, args: argparse.Namespace, co_runners: int, dtype: str = "float32") -> float:
    llm = LLM(model_path(args.model), num_threads=threads, kv_cache_bytes=256 << 20,
              linear_backend=args.linear_backend, dtype=dtype)
    step_times_ms(llm, args.seqs, args.prompt_len, 5)  # warm-up
    stop = mp.Event()
    co_args = (args.busy_ms / 1000, args.idle_ms / 1000, args.co_runner_nice, args.co_runner_sched_idle, stop)
    procs = [mp.Process(target=_co_runner, args=co_args, daemon=True)
             for _ in range(co_runners)]
    for p in procs:
        p.start()
    side = concurrent.futures.ThreadPoolExecutor(1)  # a live second thread, as asyncio.to_thread keeps one
    try:
        if args.side_thread_copy:  # one parallel torch op there: a second OpenMP team, alive from now on
            side.submit(_large_copy).result()
        if not args.step_on_other_thread:
            return statistics.median(step_times_ms(llm, args.seqs, args.prompt_len, args.steps))
        # the engine was built (and warmed) on this thread; step it from another, as a server
        # whose engine loop thread is not the thread that built the engine would
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            return pool.submit(lambda: statistics.median(
                step_times_ms(llm, args.seqs, args.prompt_len, args.steps))).result()
    finally:
        side.shutdown()
        stop.set()
        for p in procs:
            p.join(5)
            if p.is_alive():
                p.terminate()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="small", help="a `model:` setting: small, smollm2-135m-instruct, a folder, ...")
    p.add_argument("--threads", default="1,2", help="comma-separated torch thread counts")
    p.add_argument("--linear-backend", default="auto", choices=("auto", "torch", "onednn"))
    p.add_argument("--seqs", type=int, default=4)
    p.add_argument("--prompt-len", type=int, default=300)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--co-runners", type=int, default=2)
    p.add_argument("--busy-ms", type=float, default=1.0)
    p.add_argument("--idle-ms", type=float, default=4.0)
    p.add_argument("--co-runner-nice", type=int, default=0,
                   help="niceness the co-runners add to their own (0: the engine's priority)")
    p.add_argument("--step-on-other-thread", action="store_true",
                   help="build the engine on the main thread and time its steps on another (two OpenMP teams)")
    p.add_argument("--side-thread-copy", action="store_true",
                   help="first run one large parallel torch copy on a second thread that stays alive")
    p.add_argument("--co-runner-sched-idle", action="store_true", help="co-runners under SCHED_IDLE")
    p.add_argument("--repeats", type=int, default=3, help="alone/crowded pairs; the table shows medians")
    p.add_argument("--dtypes", default="float32", help="comma-separated engine dtypes (float32, bfloat16)")
    args = p.parse_args()
    print(f"linear_backend {args.linear_backend}; decode step of {args.seqs} sequences ({args.prompt_len}-token "
          f"prompts), median over {args.steps} steps and {args.repeats} repeats; "
          f"co-runners: {args.co_runners} x ({args.busy_ms} ms busy, {args.idle_ms} ms idle, "
          f"nice +{args.co_runner_nice}{', SCHED_IDLE' if args.co_runner_sched_idle else ''})")
    print("| dtype | torch threads | alone ms | with co-runners ms | slowdown |\n|---|---:|---:|---:|---:|")
    for threads in (int(t) for t in args.threads.split(",")):
        for dtype in args.dtypes.split(","):
            alone, crowded = [], []
            for _ in range(args.repeats):  # interleaved, so drift on a shared machine hits both alike
                alone.append(measure(threads, args, 0, dtype))
                crowded.append(measure(threads, args, args.co_runners, dtype))
            a, c = statistics.median(alone), statistics.median(crowded)
            print(f"| {dtype} | {threads} | {a:.1f} | {c:.1f} | {c / a:.2f}x |", flush=True)


if __name__ == "__main__":
    main()

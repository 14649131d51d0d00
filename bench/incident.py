"""`pdserve incident`: replay the incident on the real engine, simulate it at GPU scale, write the report.

Default sizes take several minutes on a 2-core CPU (one torch thread);
`--quick` shrinks the replay (fewer, shorter requests, a smaller arena) and
the simulated duration so the whole command finishes in well under a minute.
Output: report.md, summary.json and PNG plots in --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bench.incident_sim import GPUSpec

QUICK_REPLAY = {"num_requests": 40, "scale": 0.1, "num_kv_blocks": 64, "max_num_batched_tokens": 256,
                "rate_per_step": 0.2}
QUICK_SIM_DURATION_S = 180.0
DEFAULT_SIM_RATE = 12.0  # requests/s: above what any configuration sustains, so each runs at its memory limit


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="small sizes: finishes in under a minute")
    parser.add_argument("--out", default="results/incident", help="directory for report.md, summary.json, PNGs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sim-duration", type=float, default=None,
                        help="simulated seconds of peak traffic (default 3600; --quick 180)")
    parser.add_argument("--sim-rate", type=float, default=DEFAULT_SIM_RATE, help="simulated arrivals per second")
    parser.add_argument("--model", default=None, help="model folder for the replay (default: built-in tiny)")


def run(args: argparse.Namespace) -> int:
    from bench.incident_replay import ReplayConfig, replay_all
    from bench.incident_report import write
    from bench.incident_sim import CONFIGS, GPUSpec, Traffic, simulate_all

    replay_config = ReplayConfig(seed=args.seed, model=args.model, **(QUICK_REPLAY if args.quick else {}))
    duration = args.sim_duration or (QUICK_SIM_DURATION_S if args.quick else 3600.0)
    traffic = Traffic(duration_s=duration, rate_per_s=args.sim_rate, seed=args.seed)
    gpu = GPUSpec()
    begin = time.perf_counter()
    print(f"replaying {replay_config.num_requests} requests on the real engine, 3 layouts...", flush=True)
    replay_runs, identical = replay_all(replay_config)
    print(f"  done in {time.perf_counter() - begin:.0f} s; simulating {duration:.0f} s of traffic at "
          f"{traffic.rate_per_s} req/s on an 80 GB GPU, {len(CONFIGS)} configurations...", flush=True)
    sim_runs = simulate_all(traffic, gpu)
    settings = {
        "command": "pdserve incident " + shlex.join(sys.argv[2:] if sys.argv[1:2] == ["incident"] else []),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
        "date": datetime.date.today().isoformat(),
        "replay": dataclasses.asdict(replay_config),
        "sim": {"gpu": _describe_gpu(gpu), "traffic": f"{traffic.rate_per_s} req/s Poisson for "
                f"{traffic.duration_s:.0f} s, max_num_seqs {traffic.max_num_seqs}",
                "num_requests": int(sim_runs[0].counters["arrived"])},
    }
    path = write(Path(args.out), replay_runs, identical, sim_runs, settings)
    print(f"report: {path} ({time.perf_counter() - begin:.0f} s)")
    return 0


def _describe_gpu(gpu: GPUSpec) -> str:
    return (f"KV budget {gpu.kv_budget_bytes / (1 << 30):.0f} GiB = {gpu.num_blocks:,} blocks of {gpu.block_size} "
            f"tokens, {gpu.bytes_per_token // 1024} KiB per token, {gpu.weight_bytes / 1e9:.2f} GB of weights, "
            f"{gpu.memory_bandwidth / 1e12:.2f} TB/s and {gpu.flops / 1e12:.0f} TFLOPS achieved")

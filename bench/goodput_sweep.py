"""Goodput at rising load: the two-product mix against several serving systems, one rate after another.

    python -m bench.goodput_sweep --serve-model small --rates 0.5 1 1.5 2 --duration 90 --drain 60 \\
        --scale 0.25 --seed 0 --out results/goodput
    python -m bench.goodput_sweep --serve-model small --systems colocated-fcfs,colocated-slo --rates 1 --quick

Goodput is requests per second of the sending window that finished and met both of their product's
SLOs (TTFT and mean time per output token, bench/load_stats.py); attainment is the share of the requests
sent that did. A 429 (early rejection included) counts as sent and missed.

Systems (SYSTEMS): pdserve's FCFS scheduler on three engine pools (two colocated engines of one core each;
a prefill engine on core 0 and a decode engine on core 1; one colocated engine on both cores), which are the
alternatives; the same pools with SLO scheduling and early rejection (`scheduling: slo`,
`reject_past_ttft`; some with report-gen refused sooner, by a tighter margin or a share of the decode
seats, or both), the candidates; and the vLLM CPU peer (bench/vllm_peer.sh, one engine on both cores
with the same KV memory and seats), an alternative. All pdserve systems hold 512 MiB of KV in all, as does
the peer. Each system is deployed once, warmed with a few requests, then driven at every rate in ascending
order, each load with its own seed (load_seed: no load finds an earlier one's prompts cached, and a rate's
requests are the same for every system), and stopped. Targets 127.0.0.1 only; each rate
is bounded by --duration and --drain.

The verdict (`verdict`): at the lowest rate where the best alternative meets fewer than 90% of its
requests' SLOs, the best candidate's goodput over that alternative's; and whether the candidate kept
support-chat's P99 TTFT within its SLO at every rate up to there.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.load_bench import add_arguments
from bench.load_client import require_local
from bench.load_stats import ALL
from bench.offline_throughput import model_path
from bench.serving_compare import _COLOCATED_POOL, _DISAGGREGATED_POOL, deployed, load_run, merge, write_variant

REPO = Path(__file__).resolve().parent.parent
ATTAINMENT_FLOOR = 0.9  # where an alternative "drops": under this share of its requests meeting both SLOs
KV_BYTES = 512 << 20  # every system's KV memory in all, bytes
CHAT = "support-chat"
# Refuse a request at once when its predicted time to first token is past this times its product's
# TTFT target (cluster/products.py, reject_past_ttft): a request that will miss is not worth admitting.
REJECT_PAST_TTFT = 1.0
_SLO_POLICY = {"engine": {"scheduling": "slo"}, "reject_past_ttft": REJECT_PAST_TTFT}
# The share of a decode engine's seats (what its ITL targets allow) report-gen may fill (cluster/products.py,
# decode_seat_share; product files in name order: report-gen, support-chat). A report decodes ~30x a chat's
# tokens, so under overload reports are refused first and the seats they leave serve many chats, which are
# never refused for seats.
REPORT_SEAT_SHARE = 0.8
_SEATS_POLICY = {**_SLO_POLICY, "per_product": [{"decode_seat_share": REPORT_SEAT_SHARE}, {}]}
# The same preference through the TTFT check alone: report-gen refused once its predicted time to first token
# is past this times its 3 s target (1 s, support-chat's target), so a report is refused before a chat.
REPORT_REJECT_PAST_TTFT = 1 / 3
_REPORT_MARGIN_POLICY = {**_SLO_POLICY, "per_product": [{"reject_past_ttft": REPORT_REJECT_PAST_TTFT}, {}]}
# Both: reports refused at the 1 s margin and past their share of the seats, so chats always find a seat.
_MARGIN_SEATS_POLICY = {**_SLO_POLICY, "per_product": [{"reject_past_ttft": REPORT_REJECT_PAST_TTFT,
                                                        "decode_seat_share": REPORT_SEAT_SHARE}, {}]}
# The pools as the alternatives run them: first come first served (the shipped products schedule by SLO).
_FCFS = {"engine": {"scheduling": "fcfs"}}
_COLOCATED = merge(_COLOCATED_POOL, {"engine": {**_FCFS["engine"], "kv_cache_bytes": KV_BYTES // 2}})  # two engines
# One colocated engine on both cores with the pools' seats, shaped like the vLLM peer: a prompt's prefill gets
# both cores (a 500-token prompt takes ~1 s on one), and decodes batch in one engine instead of two.
_SINGLE = {"pool": "shared", "disaggregated": False, "prefill": {"autoscaling": {"min_replicas": 1, "max_replicas": 1}},
           "decode": {"num_cpus": 1, "autoscaling": {"min_replicas": 1, "max_replicas": 1}},
           "engine": {**_FCFS["engine"], "kv_cache_bytes": KV_BYTES, "num_threads": 2, "max_num_seqs": 64}}
_DISAGGREGATED = merge(_DISAGGREGATED_POOL, {**_FCFS, "prefill": {"engine": {"kv_cache_bytes": KV_BYTES // 4}},
                                             "decode": {"engine": {"kv_cache_bytes": KV_BYTES * 3 // 4}}})


@dataclass(frozen=True)
class System:
    """One serving system of the sweep. override: merged into every product file (bench/serving_compare.py);
    None for the vLLM peer. candidate: SLO scheduling with early rejection (else an alternative)."""

    label: str
    override: Mapping[str, Any] | None
    candidate: bool


SYSTEMS: dict[str, System] = {
    "colocated-fcfs": System("pdserve colocated, FCFS", _COLOCATED, False),
    "disaggregated-fcfs": System("pdserve disaggregated, FCFS", _DISAGGREGATED, False),
    "colocated-slo": System("pdserve colocated, SLO scheduling + early rejection", merge(_COLOCATED, _SLO_POLICY),
                            True),
    "colocated-report-margin": System("pdserve colocated, SLO scheduling + early rejection, reports at 1/3 margin",
                                      merge(_COLOCATED, _REPORT_MARGIN_POLICY), True),
    "colocated-seats": System("pdserve colocated, SLO scheduling + early rejection + decode seats",
                              merge(_COLOCATED, _SEATS_POLICY), True),
    "colocated-margin-seats": System("pdserve colocated, SLO scheduling + early rejection, reports at 1/3 margin "
                                     "and 0.8 of the decode seats", merge(_COLOCATED, _MARGIN_SEATS_POLICY), True),
    "disaggregated-slo": System("pdserve disaggregated, SLO scheduling + early rejection",
                                merge(_DISAGGREGATED, _SLO_POLICY), True),
    "disaggregated-seats": System("pdserve disaggregated, SLO scheduling + early rejection + decode seats",
                                  merge(_DISAGGREGATED, _SEATS_POLICY), True),
    "single-fcfs": System("pdserve one engine on both cores, FCFS", _SINGLE, False),
    "single-slo": System("pdserve one engine on both cores, SLO scheduling + early rejection",
                         merge(_SINGLE, _SLO_POLICY), True),
    "vllm": System("vLLM 0.32 (CPU), one engine", None, False),
}


def in_dtype(override: Mapping[str, Any], dtype: str) -> dict[str, Any]:
    """A system's override with every engine of every product in `dtype` (a role's engine inherits the
    product's)."""
    return merge(override, {"engine": {"dtype": dtype}})


@dataclass(frozen=True)
class Point:
    """One system at one offered rate (requests/s). goodput: met / duration_s (requests/s)."""

    system: str
    rate: float
    duration_s: float
    sent: int
    met: int
    rejected: int  # 429s
    failed: int  # every other error
    chat_sent: int
    chat_met: int
    chat_ttft_p99_s: float | None  # over support-chat's answered requests
    chat_ttft_slo_s: float

    @property
    def attainment(self) -> float:
        return self.met / self.sent if self.sent else 0.0

    @property
    def goodput(self) -> float:
        return self.met / self.duration_s

    @property
    def chat_ttft_ok(self) -> bool:
        return self.chat_ttft_p99_s is not None and self.chat_ttft_p99_s <= self.chat_ttft_slo_s


@dataclass(frozen=True)
class Verdict:
    """The goal at `rate`, the lowest rate where the best alternative's attainment is under ATTAINMENT_FLOOR."""

    rate: float
    alternative: Point
    candidate: Point
    ratio: float  # candidate goodput / alternative goodput (inf when the alternative met none)
    chat_ttft_ok_up_to_rate: bool  # the candidate's support-chat TTFT P99 within its SLO at every rate <= rate


def verdict(points: Sequence[Point]) -> Verdict | None:
    """None when no alternative dropped under the floor at any rate swept (or no candidate ran there)."""
    candidates = {p.system for p in points if SYSTEMS[p.system].candidate}
    for rate in sorted({p.rate for p in points}):
        here = [p for p in points if p.rate == rate]
        alternatives = [p for p in here if not SYSTEMS[p.system].candidate]
        new = [p for p in here if SYSTEMS[p.system].candidate]
        if not alternatives or not new:
            continue
        best_alt = max(alternatives, key=lambda p: p.attainment)
        if best_alt.attainment >= ATTAINMENT_FLOOR:
            continue
        best_new = max(new, key=lambda p: p.goodput)
        ratio = best_new.goodput / best_alt.goodput if best_alt.goodput else float("inf")
        upto = [p for p in points if p.system == best_new.system and p.rate <= rate]
        assert best_new.system in candidates
        return Verdict(rate, best_alt, best_new, ratio, all(p.chat_ttft_ok for p in upto))
    return None


def point(system: str, rate: float, duration_s: float, summary: Any) -> Point:
    """A Point from a RunSummary (bench/load_stats.py)."""
    every, chat = summary.products[ALL], summary.products[CHAT]
    return Point(system=system, rate=rate, duration_s=duration_s, sent=every.sent, met=every.slo_met,
                 rejected=every.rate_limited, failed=every.sent - every.ok - every.rate_limited,
                 chat_sent=chat.sent, chat_met=chat.slo_met, chat_ttft_p99_s=chat.ttft.p99,
                 chat_ttft_slo_s=chat.slo.ttft_s)


def table(points: Sequence[Point]) -> str:
    """Markdown: a row per rate, a column per system: attainment, goodput, 429s and chat TTFT P99."""
    systems = list(dict.fromkeys(p.system for p in points))
    rates = sorted({p.rate for p in points})
    by = {(p.system, p.rate): p for p in points}
    lines = ["| req/s | " + " | ".join(SYSTEMS[s].label for s in systems) + " |",
             "|---:|" + "---|" * len(systems)]
    for rate in rates:
        cells = []
        for s in systems:
            p = by.get((s, rate))
            if p is None:
                cells.append("")
                continue
            ttft = "-" if p.chat_ttft_p99_s is None else f"{p.chat_ttft_p99_s:.2f} s"
            cells.append(f"{p.met}/{p.sent} ({p.attainment:.0%}), {p.goodput:.2f} req/s, "
                         f"{p.rejected} 429, chat P99 TTFT {ttft}")
        lines.append(f"| {rate:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def describe(v: Verdict | None) -> str:
    if v is None:
        return "No alternative dropped under 90% attainment at the rates swept: no verdict."
    return (f"At {v.rate:g} req/s the best alternative, {SYSTEMS[v.alternative.system].label}, met "
            f"{v.alternative.attainment:.0%} ({v.alternative.goodput:.2f} req/s of goodput); the best candidate, "
            f"{SYSTEMS[v.candidate.system].label}, {v.candidate.attainment:.0%} ({v.candidate.goodput:.2f} req/s): "
            f"**{v.ratio:.2f}x** (goal 1.5x). The candidate's support-chat TTFT P99 was "
            f"{'within' if v.chat_ttft_ok_up_to_rate else 'NOT within'} its SLO at every rate up to there.")


@contextlib.contextmanager
def vllm_peer(model: str, port: int, log: Path, dtype: str = "float32") -> Iterator[str]:
    """The vLLM CPU peer serving `model` (as `model:` names it) in `dtype` on 127.0.0.1:port with KV_BYTES and
    the pdserve pools' seats, until the block ends; yields its base URL."""
    env = {**os.environ, "PEER_MODEL": model, "VLLM_PORT": str(port), "KV_BYTES": str(KV_BYTES),
           "MAX_NUM_SEQS": "64", "PEER_SERVE_ONLY": "1", "PEER_DTYPE": dtype}
    print(f"\n=== vLLM peer: starting (log {log})", flush=True)
    with log.open("w") as out:
        proc = subprocess.Popen(["bash", str(REPO / "bench" / "vllm_peer.sh")], cwd=REPO, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        _wait_ready(f"{base}/v1/models", proc, deadline_s=900.0)
        yield base
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _wait_ready(url: str, proc: subprocess.Popen, deadline_s: float) -> None:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the vLLM peer exited ({proc.returncode}) before serving")
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(url, timeout=5):
                return
        time.sleep(1.0)
    raise RuntimeError(f"the vLLM peer did not answer {url} within {deadline_s:.0f} s")


def _wait_port_free(port: int, deadline_s: float) -> None:
    """Wait until 127.0.0.1:port can be bound: a stopped server's last process may hold it a while, and the
    next system (pdserve's direct ingress binds the port itself) would find it taken."""
    deadline = time.monotonic() + deadline_s
    while True:
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers bind: a live listener blocks
            try:
                sock.bind(("127.0.0.1", port))
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"port {port} still taken {deadline_s:.0f} s after its server stopped") from None
        time.sleep(0.5)


def _load(args: argparse.Namespace, base: str, out: Path | None, label: str, **overrides: Any) -> tuple[Any, float]:
    """One load run against `base` with `overrides` on the options; its RunSummary (written to `out`) and
    its sending window, seconds."""
    run_args = copy.copy(args)
    for key, value in overrides.items():
        setattr(run_args, key, value)
    summary, plan = load_run(run_args, base, label, out)
    return summary, plan.limits.duration_s


def load_seed(seed: int, rate: float | None) -> int:
    """The request seed of one load: per rate (the same for every system), and another for the warm-up
    (rate None). A request is a pure function of its seed and index, so loads sharing a seed would send
    the same prompts again, and a later load would find them in the prefix cache."""
    return seed + (1_000_000 if rate is None else round(rate * 1000))


def sweep_system(name: str, base: str, args: argparse.Namespace, out: Path) -> list[Point]:
    """Warm `name` (8 requests, 2 at a time, not counted), then every rate in ascending order."""
    peer = SYSTEMS[name].override is None
    served = {"model": Path(args.serve_model).stem, "system_prompt": "client"} if peer else {}
    _load(args, base, None, name, rate=None, concurrency=2, requests=8, duration=60.0,
          seed=load_seed(args.seed, None), **served)
    points = []
    for rate in sorted(args.rates):
        summary, duration_s = _load(args, base, out / name / f"rate-{rate:g}", f"{SYSTEMS[name].label}, {rate:g} req/s",
                                    rate=rate, seed=load_seed(args.seed, rate), **served)
        points.append(point(name, rate, duration_s, summary))
        print(table(points), flush=True)
    return points


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    parser.add_argument("--rates", type=float, nargs="+", required=True, help="offered loads, requests/s")
    parser.add_argument("--systems", default=",".join(SYSTEMS), help="comma-separated, from: " + ", ".join(SYSTEMS))
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--num-cpus", type=int, default=8, help="logical CPUs of each local Ray")
    parser.add_argument("--direct-ingress", action="store_true",
                        help="pdserve's ingress answers HTTP itself, without Serve's proxy hop (`pdserve up "
                             "--direct-ingress`), as the vLLM peer's server does")
    parser.add_argument("--serve-model", default="small",
                        help="the model every system serves, as `model:` names it (engine/models.py)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="every system's weights, activations and KV (bfloat16: CPUs with native bfloat16 "
                             "dot products); KV_BYTES stays the budget in bytes")
    parser.set_defaults(out="bench-out/goodput")
    args = parser.parse_args(argv)
    names = [s for s in args.systems.split(",") if s]
    unknown = [s for s in names if s not in SYSTEMS]
    if unknown:
        parser.error(f"unknown systems {unknown}; choose from {list(SYSTEMS)}")
    require_local(f"http://127.0.0.1:{args.port}/v1")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    args.tokenizer = args.tokenizer or args.serve_model  # prompts sized for the model that is served
    points: list[Point] = []
    with tempfile.TemporaryDirectory(prefix="pdserve-goodput-") as tmp:
        for name in names:
            system = SYSTEMS[name]
            if system.override is None:
                server = vllm_peer(args.serve_model, args.port, out / "vllm-peer.log", args.dtype)
            else:
                config = write_variant(Path(args.products_dir), in_dtype(system.override, args.dtype),
                                       Path(tmp) / name, model_path(args.serve_model))
                server = deployed(system.label, config, args.port, args.num_cpus, args.direct_ingress)
            with server as base:
                points.extend(sweep_system(name, base, args, out))
            _wait_port_free(args.port, deadline_s=60.0)
            (out / "points.json").write_text(json.dumps([asdict(p) for p in points], indent=2))
    command = "python -m bench.goodput_sweep " + " ".join(argv if argv is not None else sys.argv[1:])
    text = "\n\n".join([f"`{command}`", table(points), describe(verdict(points))]) + "\n"
    (out / "goodput.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

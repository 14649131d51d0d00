"""One engine's scheduler under the two-product mix in real time, without the serving stack.

The goodput sweep (bench/goodput_sweep.py) measures SLO attainment over HTTP, where the ingress, the
routers and two engines share the box with the scheduler. This bench keeps only the scheduler's part:
one real Engine on one thread, requests added when their Poisson arrival time comes (between steps, as
the async engine adds them), each with its product's SLO and early rejection, every policy fed the
same seeded requests one after the other. A request's time to first token runs from its arrival, so
the step it waited for is counted; its time per output token is (finish - first token) / (tokens - 1),
as the sweep judges it. Per step it records the decodes, prompt tokens and seconds, so a miss can be
traced to the steps it waited through.

    python -m bench.engine_slo --rate 1.25 --duration 90 --scale 0.25 --dtype bfloat16 --policies fcfs,slo

Units: seconds, tokens, requests per second.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.load_report import markdown
from bench.load_stats import CANCELLED, OK, RATE_LIMITED, RequestRecord, meets_slo, summarize
from bench.workload import (
    PRODUCTS_DIR,
    REPORT_GEN,
    SUPPORT_CHAT,
    ChatMix,
    ChatRequest,
    Poisson,
    chat_requests,
    default_mix,
)
from cluster.products import load_products
from engine import LLM, Engine, SamplingParams
from engine.config import SLO
from engine.scheduler import OverloadedError

# The products' targets, from their files (deploy/products/*.yaml: support-chat 1 s and 0.2 s, report-gen 3 s
# and 0.25 s), and early rejection as the goodput sweep's "report margin" system sets it: a request is refused
# once its predicted first token is past 1 s.
PRODUCT_SLOS = {name: p.slo for name, p in load_products(PRODUCTS_DIR).items()}
REJECT_PAST_S = {SUPPORT_CHAT: 1.0, REPORT_GEN: 1.0}
SYSTEM_PROMPT_TOKENS = 220
WARMUP_REQUESTS = 6

Arrival = tuple[ChatRequest, list[int]]  # a request of the mix and its prompt's token ids


@dataclass(frozen=True)
class Outcome:
    """One request: refused (429) or served; times in seconds after the run's start."""

    request_id: str
    product: str
    arrival_s: float
    prompt_tokens: int
    max_tokens: int
    refused: bool
    first_token_s: float | None = None
    finish_s: float | None = None
    cached_tokens: int = 0

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_s is None else self.first_token_s - self.arrival_s

    def record(self) -> RequestRecord:
        """As the HTTP benches record a request (bench/load_stats.py): a 429, finished, or cancelled at the
        drain bound; every answer runs to max_tokens (ignore_eos)."""
        if self.refused:
            return RequestRecord(self.request_id, self.product, self.arrival_s, RATE_LIMITED)
        if self.finish_s is None:
            return RequestRecord(self.request_id, self.product, self.arrival_s, CANCELLED, ttft_s=self.ttft_s)
        return RequestRecord(self.request_id, self.product, self.arrival_s, OK, ttft_s=self.ttft_s,
                             e2e_s=self.finish_s - self.arrival_s, output_tokens=self.max_tokens,
                             prompt_tokens=self.prompt_tokens, cached_tokens=self.cached_tokens)

    def met(self) -> bool:
        return meets_slo(self.record(), PRODUCT_SLOS[self.product])


@dataclass(frozen=True)
class Step:
    """One engine step: when it ended (seconds after the start), its decodes, prompt tokens and duration."""

    end_s: float
    decodes: int
    prompt_tokens: int
    seconds: float


def workload(mix: ChatMix, rate: float, duration_s: float, seed: int, vocab_size: int) -> list[Arrival]:
    """The mix's requests arriving within duration_s, each with token ids: the shared system prompt, then
    its own user tokens (seeded per request, so a prompt is the same for every policy)."""
    system = random.Random(f"{seed}:system")
    system_ids = [system.randrange(3, vocab_size) for _ in range(SYSTEM_PROMPT_TOKENS)]
    out = []
    for req in chat_requests(mix, Poisson(rate), seed):
        if req.arrival_s > duration_s:
            break
        rng = random.Random(f"{seed}:user:{req.request_id}")
        out.append((req, system_ids + [rng.randrange(3, vocab_size) for _ in range(req.user_tokens)]))
    return out


def run_policy(args: argparse.Namespace, policy: str, requests: Sequence[Arrival]) -> tuple[list[Outcome], list[Step]]:
    """Serve `requests` on a fresh engine with `policy` in real time; every request ends (or is refused)."""
    llm = LLM(args.model, dtype=args.dtype, num_threads=1, scheduling=policy, kv_cache_bytes=args.kv_bytes,
              max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens)
    engine = llm.engine
    _warm_up(engine, requests)
    pending = list(requests)
    live: dict[str, Arrival] = {}
    outcomes: list[Outcome] = []
    steps: list[Step] = []
    start = time.monotonic()
    while pending or live:
        now = time.monotonic() - start
        if now > args.duration + args.drain:  # bounded: what is still running is aborted and counted as missed
            for req, ids in live.values():
                engine.abort_request(req.request_id)
                outcomes.append(Outcome(req.request_id, req.product, req.arrival_s, len(ids), req.max_tokens, False))
            break
        while pending and pending[0][0].arrival_s <= now:
            req, ids = pending.pop(0)
            params = SamplingParams(max_tokens=req.max_tokens, temperature=0.0, ignore_eos=True)
            try:
                share = args.report_seat_share if req.product == REPORT_GEN else None
                slo = SLO(ttft_s=PRODUCT_SLOS[req.product].ttft_s, itl_s=PRODUCT_SLOS[req.product].itl_s)
                engine.add_request(ids, params, request_id=req.request_id, slo=slo,
                                   reject_past_s=REJECT_PAST_S[req.product], decode_seat_share=share)
                live[req.request_id] = (req, ids)
            except OverloadedError:
                outcomes.append(Outcome(req.request_id, req.product, req.arrival_s, len(ids), req.max_tokens, True))
        if not engine.has_unfinished_requests():
            time.sleep(max(0.0, min(0.01, pending[0][0].arrival_s - now)) if pending else 0.0)
            continue
        computed = engine.stats().prompt_tokens_computed
        before = time.monotonic()
        touched = engine.step()
        after = time.monotonic()
        decodes = sum(1 for r in touched if r.num_output_tokens > 1)
        steps.append(Step(after - start, decodes, engine.stats().prompt_tokens_computed - computed, after - before))
        for r in touched:
            if r.is_finished:
                req, _ = live.pop(r.request_id)
                outcomes.append(Outcome(req.request_id, req.product, req.arrival_s, r.num_prompt_tokens, req.max_tokens,
                                        False, r.first_token_time - start, after - start, max(r.num_cached_tokens, 0)))
    return outcomes, steps


def _warm_up(engine: Engine, requests: Sequence[Arrival]) -> None:
    """Teach the step-cost model (prompt-only, mixed and decode steps) and cache the system prompt."""
    for i, (_, ids) in enumerate(requests[:WARMUP_REQUESTS]):
        engine.add_request(ids[:SYSTEM_PROMPT_TOKENS + 8 * (i + 1)], SamplingParams(max_tokens=8, ignore_eos=True),
                           request_id=f"warm-{i}")
        engine.step()
    while engine.has_unfinished_requests():
        engine.step()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="small")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--rate", type=float, default=1.25, help="requests per second")
    ap.add_argument("--duration", type=float, default=90.0, help="seconds of arrivals")
    ap.add_argument("--drain", type=float, default=120.0,
                    help="seconds after the last arrival before what still runs is aborted (counted as missed)")
    ap.add_argument("--scale", type=float, default=0.25)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--policies", default="fcfs,slo")
    ap.add_argument("--kv-bytes", type=int, default=256 << 20)
    ap.add_argument("--max-num-seqs", type=int, default=32)
    ap.add_argument("--max-num-batched-tokens", type=int, default=1024)
    ap.add_argument("--report-seat-share", type=float, default=None,
                    help="report-gen may fill at most this share of the decode seats (default: no limit)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.report_seat_share is not None and not 0 < args.report_seat_share <= 1:
        ap.error(f"--report-seat-share must be in (0, 1], got {args.report_seat_share}")
    probe = LLM(args.model, dtype=args.dtype, num_threads=1, kv_cache_bytes=16 << 20)
    requests = workload(default_mix(scale=args.scale), args.rate, args.duration, args.seed, probe.engine.vocab_size)
    del probe
    for policy in args.policies.split(","):
        outcomes, steps = run_policy(args, policy, requests)
        summary = summarize((o.record() for o in outcomes), PRODUCT_SLOS, args.duration)
        print(markdown(summary, {"policy": policy, "rate": args.rate, "seat share": args.report_seat_share}),
              flush=True)
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / f"{policy}.jsonl").write_text("".join(json.dumps(asdict(o)) + "\n" for o in outcomes))
            (args.out / f"{policy}-steps.jsonl").write_text("".join(json.dumps(asdict(s)) + "\n" for s in steps))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

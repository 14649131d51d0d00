"""`pdserve bench`: the two-product mix against an OpenAI-compatible endpoint on this machine.

    pdserve bench --base-url http://127.0.0.1:8000/v1 --rate 2 --duration 120 --scale 0.1 --out out/pdserve
    pdserve bench --base-url http://127.0.0.1:8001/v1 --model small ...          # vllm serve: one model

The same seed gives the same requests against every server (bench/workload.py). Products come from
--products-dir (system prompts, SLOs); pdserve serves one model name per product and adds the
product's system prompt itself, so with model names equal to product names (the default) the
client sends the user message only; for any other server it sends the system prompt too.
--quick: a small bounded run (tiny lengths, 32 requests, 4 in flight, < 1 minute).

This module imports only the standard library at import time: `pdserve --help` stays fast.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # annotations only: importing these at run time would slow `pdserve --help`
    from bench.load_client import ChatSender
    from bench.load_dispatch import Limits, LoadResult
    from bench.load_stats import RequestRecord
    from bench.workload import Arrival, ChatMix
    from cluster.products import SLO

DEFAULT_URL = "http://127.0.0.1:8000/v1"
PRODUCTS_DIR = Path(__file__).resolve().parent.parent / "deploy" / "products"
QUICK = {"duration": 30.0, "requests": 32, "concurrency": 4, "scale": 0.05, "drain": 20.0}
DEFAULTS = {"duration": 120.0, "requests": None, "concurrency": 8, "scale": 1.0, "drain": 60.0}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-url", default=DEFAULT_URL, help="OpenAI base URL; host must be 127.0.0.1 or localhost")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY", "EMPTY"), help="Bearer key for every product")
    p.add_argument("--product-key", action="append", default=[], metavar="PRODUCT=KEY", help="a product's own key")
    p.add_argument("--model", default=None, help="one served model name for every product (e.g. vllm serve's)")
    p.add_argument("--model-map", action="append", default=[], metavar="PRODUCT=MODEL",
                   help="served model name of a product (default: the product's name, as pdserve serves it)")
    p.add_argument("--system-prompt", choices=("auto", "client", "server"), default="auto",
                   help="who adds the product's system prompt; auto: the server when model names are product "
                        "names (pdserve), else the client")
    load = p.add_mutually_exclusive_group()
    load.add_argument("--rate", type=float, default=None, help="open loop: Poisson arrivals, requests per second")
    load.add_argument("--concurrency", type=int, default=None, help="closed loop: requests in flight (default 8)")
    p.add_argument("--requests", type=int, default=None, help="send at most this many requests")
    p.add_argument("--duration", type=float, default=None, help="stop sending after this many seconds (default 120)")
    p.add_argument("--drain", type=float, default=None, help="seconds to let the last requests finish (default 60)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer", default=None, metavar="MODEL",
                   help="the model whose tokenizer sizes the prompts, as `model:` names it (default: the products' "
                        "model in --products-dir)")
    p.add_argument("--eos", action="store_true",
                   help="let the model end its answers (no ignore_eos): real answer lengths, max_tokens a cap")
    p.add_argument("--scale", type=float, default=None, help="multiply user prompt and output lengths (default 1)")
    p.add_argument("--mix", action="append", default=[], metavar="PRODUCT=WEIGHT", help="share of requests (1:1)")
    p.add_argument("--slo", action="append", default=[], metavar="PRODUCT=TTFT_S,ITL_S",
                   help="override a product's SLO (default: its products-dir config)")
    p.add_argument("--products-dir", default=str(PRODUCTS_DIR), help="product configs: system prompts and SLOs")
    p.add_argument("--out", default="bench-out/load", help="directory for results.json/.md, requests.jsonl, PNG")
    p.add_argument("--quick", action="store_true", help="small bounded run for CI: " + str(QUICK))
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


@dataclass(frozen=True)
class BenchPlan:
    """Everything a run needs, resolved from the options (quick or default values where none were given)."""

    mix: ChatMix
    arrival: Arrival
    limits: Limits
    models: Mapping[str, str]  # product -> served model name
    tokenizer: str | None  # the `model:` setting whose tokenizer sized the prompts
    ignore_eos: bool  # every answer runs to max_tokens (fixed lengths) or ends where the model ends it
    include_system: bool  # the client sends the system prompt (the server does not add it)
    slos: Mapping[str, SLO]
    seed: int

    def settings(self) -> dict[str, Any]:
        """JSON-ready description of the run, for the report."""
        return {"models": dict(self.models), "tokenizer": self.tokenizer, "ignore_eos": self.ignore_eos,
                "system_prompt_sent": self.include_system, "arrival": repr(self.arrival),
                "seed": self.seed, "scale": self.mix.scale, "mix": {p.name: p.weight for p in self.mix.products},
                "limits": repr(self.limits), "slos": {k: v.model_dump() for k, v in self.slos.items()}}


def run(args: argparse.Namespace) -> int:
    """Run the benchmark described by `args`; print the tables; 0 when at least one request succeeded."""
    from bench.load_client import ChatSender, Endpoint, require_local

    require_local(args.base_url)  # before any work: a refused URL fails fast
    started = datetime.datetime.now().isoformat(timespec="seconds")
    plan = plan_from_args(args)
    keys = _pairs(args.product_key, "--product-key")
    endpoint = Endpoint(base_url=args.base_url, models=plan.models, api_keys=keys, default_api_key=args.api_key,
                        include_system=plan.include_system, ignore_eos=plan.ignore_eos)
    result = asyncio.run(run_plan(plan, ChatSender(endpoint), progress=not args.no_progress))
    return _report(args, plan, result, started)


def plan_from_args(args: argparse.Namespace) -> BenchPlan:
    """The workload, arrival process, limits, model names and SLOs the options ask for."""
    from bench.load_dispatch import Limits
    from bench.workload import Concurrency, Poisson, default_mix
    from cluster.products import load_products

    base = QUICK if args.quick else DEFAULTS
    value = {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in base.items()}
    arrival = Poisson(args.rate) if args.rate is not None else Concurrency(value["concurrency"])
    weights = {k: float(v) for k, v in _pairs(args.mix, "--mix").items()} or None
    mix = default_mix(weights=weights, scale=value["scale"], products_dir=args.products_dir)
    names = [p.name for p in mix.products]
    models = {name: args.model or name for name in names} | _pairs(args.model_map, "--model-map")
    include_system = {"client": True, "server": False}.get(args.system_prompt,
                                                           any(models[n] != n for n in names))
    configs = load_products(args.products_dir)
    slos = {name: configs[name].slo for name in names} | _slos(args.slo)
    limits = Limits(duration_s=value["duration"], max_requests=value["requests"], drain_s=value["drain"])
    tokenizer = args.tokenizer or next(iter(configs.values())).model
    return BenchPlan(mix=mix, arrival=arrival, limits=limits, models=models, tokenizer=tokenizer,
                     ignore_eos=not args.eos, include_system=include_system, slos=slos, seed=args.seed)


async def run_plan(plan: BenchPlan, sender: ChatSender, progress: bool) -> LoadResult:
    """Send the plan's requests through `sender` (closed afterwards); every request's record."""
    from tqdm import tqdm

    from bench.load_dispatch import run_load
    from bench.prompt_text import model_tokenizer
    from bench.workload import chat_requests

    requests = chat_requests(plan.mix, plan.arrival, plan.seed, model_tokenizer(plan.tokenizer))
    bar = tqdm(total=plan.limits.max_requests, unit="req", disable=not progress, desc="bench")
    failed = 0

    def done(record: RequestRecord) -> None:
        nonlocal failed
        failed += not record.ok
        bar.update(1)
        bar.set_postfix(errors=failed, refresh=False)

    try:
        return await run_load(requests, plan.arrival, plan.limits, sender, on_record=done)
    finally:
        bar.close()
        await sender.aclose()


def _report(args: argparse.Namespace, plan: BenchPlan, result: LoadResult, started: str) -> int:
    from bench.load_report import RESULTS_MD, write_report
    from bench.load_stats import summarize

    summary = summarize(result.records, plan.slos, result.wall_s)
    settings = {"started": started, "base_url": args.base_url, **plan.settings()}
    paths = write_report(summary, result.records, settings, args.out)
    print(paths[RESULTS_MD].read_text())
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0 if any(r.ok for r in result.records) else 1


def _slos(specs: list[str]) -> dict[str, SLO]:
    from cluster.products import SLO

    slos = {}
    for name, spec in _pairs(specs, "--slo").items():
        try:
            ttft, itl = (float(x) for x in spec.split(","))
        except ValueError:
            raise SystemExit(f"--slo takes PRODUCT=TTFT_S,ITL_S (seconds), got {name}={spec}") from None
        slos[name] = SLO(ttft_s=ttft, itl_s=itl)
    return slos


def _pairs(items: list[str], option: str) -> dict[str, str]:
    pairs = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"{option} takes KEY=VALUE, got {item!r}")
        pairs[key] = value
    return pairs

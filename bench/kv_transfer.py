"""KV transfer benchmark: what moving a prompt's KV costs next to computing it, per transport.

For one 2,000-token prompt of the `small` model (125 blocks of 16 tokens,
fp32): export on one Ray actor, fetch and write into a paged cache on another
(separate processes on one node, as prefill and decode workers run), median
over repeats; beside it, the time to prefill the same prompt. Then the bytes a
decode worker does not receive thanks to dedup (it already holds the system
prompt's blocks), measured through real PrefillServer/DecodeServer actors on
the seed workload. With --first-token-only: what a client waits for the first
and second tokens of a disaggregated request (real PrefillServer/DecodeServer
actors, `small` model, 2,000-token prompts), the KV exported whole after the
prompt against streamed chunk by chunk while it computes, on the ray and grpc
transports. The first token leaves the decode worker before its KV is fetched,
so the fetch delays the second; the export of a whole prompt happens before the
prefill worker replies, so it delays the first too.

    python -m bench.kv_transfer [--repeats 5] [--requests 64] [--dedup-only] [--out results/kv_transfer.json]
    python -m bench.kv_transfer --first-token-only --repeats 5 [--transports ray,grpc] [--chunk-tokens 512]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time
from pathlib import Path

import ray
import torch

from engine.config import SamplingParams
from engine.kv_cache import KVLayout, PagedKVCache
from engine.model import kv_layout, load_config
from engine.models import resolve as model_path
from kvtransfer import KVTransferConfig, make_connector

PROMPT_TOKENS = 2000


class _Exporter:
    def __init__(self, transport: str, layout: KVLayout, num_blocks: int) -> None:
        torch.set_num_threads(1)
        self.connector = make_connector(KVTransferConfig(transport=transport, lease_s=600))
        self.layout = layout
        self.blocks = torch.randn(layout.blocks_shape(num_blocks))

    def export(self):
        start = time.perf_counter()
        handle = self.connector.export("bench", self.blocks.clone(), self.layout, first_block=0,
                                       num_tokens=PROMPT_TOKENS, block_hashes=[])
        return handle, time.perf_counter() - start

    def release(self, export_id: str) -> bool:
        return self.connector.release(export_id)


class _Importer:
    def __init__(self, transport: str, layout: KVLayout, num_blocks: int) -> None:
        torch.set_num_threads(1)
        self.connector = make_connector(KVTransferConfig(transport=transport, lease_s=600))
        self.layout = layout
        self.cache = PagedKVCache(layout, num_blocks + 8)

    def fetch_and_write(self, handle) -> tuple[float, float]:
        start = time.perf_counter()
        blocks = self.connector.fetch(handle, self.layout)
        fetched = time.perf_counter()
        self.cache.write_blocks(list(range(blocks.shape[2])), blocks)
        return fetched - start, time.perf_counter() - fetched


class _InProcess:
    """The local transport is in-process by definition (colocated mode): call the objects directly."""

    def __init__(self, obj) -> None:
        self._obj = obj

    def __getattr__(self, name):
        method = getattr(self._obj, name)

        class _Call:
            @staticmethod
            def remote(*args):
                return method(*args)

        return _Call


def measure_transport(transport: str, layout: KVLayout, repeats: int) -> dict:
    num_blocks = -(-PROMPT_TOKENS // layout.block_size)
    if transport == "local":
        exporter = _InProcess(_Exporter(transport, layout, num_blocks))
        importer = _InProcess(_Importer(transport, layout, num_blocks))
        get = _identity
    else:
        opts = {"num_cpus": 0.5}
        exporter = ray.remote(**opts)(_Exporter).remote(transport, layout, num_blocks)
        importer = ray.remote(**opts)(_Importer).remote(transport, layout, num_blocks)
        get = ray.get
    try:
        rows = []
        for _ in range(repeats + 1):  # the first round warms channels and the object store
            handle, export_s = get(exporter.export.remote())
            fetch_s, write_s = get(importer.fetch_and_write.remote(handle))
            get(exporter.release.remote(handle.export_id))
            rows.append((export_s, fetch_s, write_s))
        rows = rows[1:]
        nbytes = num_blocks * layout.bytes_per_block
        total = [sum(r) for r in rows]
        return {
            "transport": transport, "bytes": nbytes,
            "export_s": statistics.median(r[0] for r in rows),
            "fetch_s": statistics.median(r[1] for r in rows),
            "write_s": statistics.median(r[2] for r in rows),
            "total_s": statistics.median(total),
            "bytes_per_s": nbytes / statistics.median(r[1] for r in rows),
        }
    finally:
        if transport != "local":
            ray.kill(exporter)
            ray.kill(importer)


def _identity(x):
    return x


def measure_prefill(path: str, repeats: int, threads: int) -> float:
    """Median seconds to prefill one PROMPT_TOKENS prompt (prefix cache off), first token included."""
    from engine import LLM

    torch.set_num_threads(threads)
    llm = LLM(path, enable_prefix_caching=False, max_num_batched_tokens=PROMPT_TOKENS,
              kv_cache_bytes=256 << 20)
    prompt = torch.randint(3, 8192, (PROMPT_TOKENS,), generator=torch.Generator().manual_seed(0)).tolist()
    params = SamplingParams(temperature=0.0, max_tokens=1)
    llm.generate([prompt[:64]], params)  # warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        llm.generate([prompt], params)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_dedup(num_requests: int) -> dict:
    """Bytes received by a decode worker over the seed workload, with and without dedup (tiny model)."""
    from bench.workload import offline_mix
    from decode_workers.server import DecodeServer
    from prefill_workers.server import PrefillServer

    requests = offline_mix(num_requests, seed=0, vocab_size=8192)
    # two tokens: with one, the prefill worker's first token ends the request and no KV is imported
    params = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)
    result = {}
    for dedup in (False, True):
        prefill = ray.remote(num_cpus=0.5, max_concurrency=64)(PrefillServer).remote(None, {"transport": "ray"})
        decode = ray.remote(num_cpus=0.5, max_concurrency=64)(DecodeServer).remote(
            None, {"transport": "ray"}, prefill, dedup=dedup)
        try:
            for r in requests:
                request = {"prompt_token_ids": list(r.prompt_token_ids), "sampling_params": params}
                for ref in decode.generate.options(num_returns="streaming").remote(request):
                    ray.get(ref)
            result["with_dedup" if dedup else "without_dedup"] = ray.get(decode.stats.remote()).kv_transfer_bytes
        finally:
            ray.kill(prefill)
            ray.kill(decode)
    result["saved_fraction"] = 1 - result["with_dedup"] / result["without_dedup"]
    return result


def measure_first_token(repeats: int, transports: tuple[str, ...] = ("ray", "grpc"),
                        chunk_tokens: int = 512) -> list[dict]:
    """Median seconds from sending a disaggregated request to its first and to its second output, the KV
    exported whole after the prompt against streamed while it computes (kv_streaming), per transport.

    `small` model, fresh 2,000-token prompts (nothing cached), one request at a time, one torch thread per
    worker. Both variants share one prefill worker whose token budget (chunk_tokens) splits the prompt into
    the same chunks, so they compute the same steps and differ only in when the KV leaves; the order of the
    two alternates per repeat, and the first pair warms the workers up.
    """
    from decode_workers.server import DecodeServer
    from prefill_workers.server import PrefillServer

    small = model_path("small")
    vocab = load_config(small).vocab_size
    rng = random.Random(40)
    rows = []
    for transport in transports:
        transfer = {"transport": transport, "lease_s": 600}
        prefill = ray.remote(num_cpus=1)(PrefillServer).remote(
            {"model": small, "num_threads": 1, "max_num_batched_tokens": chunk_tokens}, transfer)
        decodes = {streamed: ray.remote(num_cpus=1)(DecodeServer).remote(
            {"model": small, "num_threads": 1}, transfer, prefill, kv_streaming=streamed) for streamed in (False, True)}
        times: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
        try:
            for i in range(repeats + 1):
                for streamed in ((False, True) if i % 2 else (True, False)):
                    prompt = [rng.randrange(3, vocab) for _ in range(PROMPT_TOKENS)]
                    stamps = _token_times(decodes[streamed], prompt)
                    if i:
                        times[streamed].append(stamps)
        finally:
            kill = [prefill, *decodes.values()]
            for actor in kill:
                ray.kill(actor)
        rows.append(_first_token_row(transport, chunk_tokens, times))
    return rows


def _token_times(decode, prompt: list[int]) -> tuple[float, float]:
    """Seconds from sending one request (max_tokens 2) to its first and to its second token."""
    params = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)
    start = time.perf_counter()
    stamps: list[float] = []
    request = {"prompt_token_ids": prompt, "sampling_params": params}
    for ref in decode.generate.options(num_returns="streaming").remote(request):
        out = ray.get(ref)
        stamps += [time.perf_counter() - start] * len(out["new_token_ids"])
    return stamps[0], stamps[1]


def _first_token_row(transport: str, chunk_tokens: int, times: dict[bool, list[tuple[float, float]]]) -> dict:
    """Medians of each variant's first and second token, and the paired ratios streamed / whole (median)."""
    whole, streamed = times[False], times[True]
    row = {"transport": transport, "chunk_tokens": chunk_tokens, "repeats": len(whole)}
    for k, name in enumerate(("first", "second")):
        row[f"whole_{name}_s"] = statistics.median(t[k] for t in whole)
        row[f"streamed_{name}_s"] = statistics.median(t[k] for t in streamed)
        row[f"{name}_ratio"] = statistics.median(s[k] / w[k] for w, s in zip(whole, streamed, strict=True))
    return row


def print_first_token(rows: list[dict]) -> None:
    print(f"| transport | chunk tokens | first token ms, whole | streamed | streamed / whole | second token ms, "
          f"whole | streamed | streamed / whole |  (medians of {rows[0]['repeats']}, paired ratios)")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['transport']} | {r['chunk_tokens']} | {r['whole_first_s'] * 1e3:,.0f} | "
              f"{r['streamed_first_s'] * 1e3:,.0f} | {r['first_ratio']:.3f} | {r['whole_second_s'] * 1e3:,.0f} | "
              f"{r['streamed_second_s'] * 1e3:,.0f} | {r['second_ratio']:.3f} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch threads for the prefill measurement")
    parser.add_argument("--dedup-only", action="store_true", help="only the dedup measurement")
    parser.add_argument("--first-token-only", action="store_true", help="only the first/second token measurement")
    parser.add_argument("--transports", default="ray,grpc", help="first-token mode: the transports to compare")
    parser.add_argument("--chunk-tokens", type=int, default=512,
                        help="first-token mode: the prefill worker's token budget (max_num_batched_tokens)")
    parser.add_argument("--out", default="results/kv_transfer.json")
    args = parser.parse_args(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        if args.first_token_only:
            rows = measure_first_token(args.repeats, tuple(args.transports.split(",")), args.chunk_tokens)
            print(json.dumps(rows))
            print_first_token(rows)
            return 0
        dedup = measure_dedup(args.requests)
        if args.dedup_only:
            print(json.dumps(dedup))
            return 0
        small = model_path("small")
        layout = kv_layout(load_config(small), 16, "float32")
        prefill_s = measure_prefill(small, args.repeats, args.threads)
        transports = [measure_transport(t, layout, args.repeats) for t in ("local", "ray", "grpc")]
    finally:
        ray.shutdown()
    print(f"small model, {PROMPT_TOKENS}-token prompt: prefill {prefill_s * 1000:.0f} ms "
          f"({args.threads} thread(s)), KV {transports[0]['bytes'] / 2**20:.1f} MiB\n")
    print("| transport | export ms | fetch ms | write ms | total ms | fetch MiB/s | total / prefill |")
    print("|---|---|---|---|---|---|---|")
    for t in transports:
        print(f"| {t['transport']} | {t['export_s'] * 1e3:.1f} | {t['fetch_s'] * 1e3:.1f} | {t['write_s'] * 1e3:.1f} "
              f"| {t['total_s'] * 1e3:.1f} | {t['bytes_per_s'] / 2**20:.0f} | {t['total_s'] / prefill_s:.1%} |")
    print(f"\ndedup over {args.requests} workload requests (tiny model): "
          f"{dedup['without_dedup']:,} bytes without, {dedup['with_dedup']:,} with: "
          f"{dedup['saved_fraction']:.1%} saved")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"prefill_s": prefill_s, "threads": args.threads,
                                          "transports": transports, "dedup": dedup}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The GPU check: one run that verifies and measures the engine on a CUDA device.

    python -m bench.gpu_check                         # on a GPU machine, about 6 minutes
    python -m bench.gpu_check --device cpu --quick    # the same code paths on small shapes, here

Needs torch, transformers, accelerate, triton (on CUDA), pydantic and this
repository; no Ray, no network. On a machine whose image lacks pydantic,
bench/gpu_wheels.sh fetches its wheels into .whl/ beforehand; the run there is

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl \
      && PYTHONPATH=/tmp/site:. PDSERVE_CACHE_DIR=/tmp/pdserve PYTHONUNBUFFERED=1 python3 -m bench.gpu_check

(the built-in models, llama-1b-shape included, are built on first use: about
half a minute for the 1B one). Results go to $OUT (else results/) as gpu_check.json, and a
summary is printed. Each section runs on its own: a failing one is recorded
with its error and the others still run.

Sections:
1. exact:     greedy float32 output equals transformers generate() on the same
              device, token for token, for the `tiny` and `small` built-in models
              (ragged prompts, a shared prefix for cache hits, chunked prefill).
2. bf16:      the same in bfloat16 against transformers' bfloat16; at each first
              divergence, transformers' gap between its top two logits there
              (a divergence at a near-tie is rounding, one at a wide gap a bug).
3. offline:   the two-product offline mix (bench/workload.py) with the
              `llama-1b-shape` model in bfloat16: pdserve vs transformers
              generate() in left-padded batches of 16 (goal >= 5x output tok/s).
4. decode:    decode step time at 64 sequences against the HBM roofline: weight
              bytes + KV bytes read per step at the device-to-device copy bandwidth
              measured in this run (goal within 1.3x with CUDA graphs).
5. prefill:   prefill FLOP rate (2 x params x tokens) against torch's own bf16
              GEMM rate measured in this run (goal >= 0.6).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from bench.offline_throughput import _hf_generate_batch, hf_batches
from bench.workload import offline_mix
from engine import tiny_model
from engine.config import SamplingParams
from engine.llm import LLM

SECTIONS = ("exact", "bf16", "offline", "decode", "prefill")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _prompts(vocab: int, scale: int) -> list[list[int]]:
    """Ragged prompts: two share a 40-token prefix (a prefix-cache hit), one is long (chunked prefill)."""
    g = torch.Generator().manual_seed(7)

    def draw(n: int) -> list[int]:
        return torch.randint(3, vocab, (n,), generator=g).tolist()

    shared = draw(40)
    return [shared + draw(9), shared + draw(23), draw(5), draw(17 * scale), draw(1)]


def _hf(path: str, dtype: torch.dtype, device: torch.device):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True).to(device).eval()


def _hf_greedy(model, prompt: list[int], max_new: int) -> list[int]:
    out, _ = _hf_generate_batch(model, [tuple(prompt)], max_new)
    return out[0].tolist()


def _compare(name: str, dtype: str, device: torch.device, max_new: int, scale: int) -> dict[str, Any]:
    """pdserve's greedy tokens against transformers' on `device`; per prompt the first divergence."""
    path = tiny_model.path(name)
    llm = LLM(path, device=str(device), dtype=dtype, kv_cache_bytes=256 << 20, max_num_batched_tokens=64)
    prompts = _prompts(llm.engine.vocab_size, scale)
    params = SamplingParams(temperature=0.0, max_tokens=max_new, ignore_eos=True)
    ours = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    cached = llm.stats().prefix_cache_hits
    del llm
    model = _hf(path, getattr(torch, dtype), device)
    rows = []
    for prompt, got in zip(prompts, ours, strict=True):
        want = _hf_greedy(model, prompt, max_new)
        first = next((i for i, (a, b) in enumerate(zip(got, want, strict=True)) if a != b), None)
        row: dict[str, Any] = {"prompt_len": len(prompt), "equal": first is None, "first_divergence": first}
        if first is not None:  # transformers' own top-2 gap where the outputs part
            with torch.inference_mode():
                ids = torch.tensor([prompt + want[:first]], device=device)
                logits = model(input_ids=ids).logits[0, -1].float()
            top = torch.topk(logits, 2).values
            row["top2_gap"] = float(top[0] - top[1])
        rows.append(row)
    return {"model": name, "dtype": dtype, "prompts": rows, "prefix_cache_hits": cached,
            "all_equal": all(r["equal"] for r in rows)}


def check_exact(args: argparse.Namespace) -> dict[str, Any]:
    models = ("tiny",) if args.quick else ("tiny", "small")
    return {m: _compare(m, "float32", args.device, args.max_new, args.scale) for m in models}


def check_bf16(args: argparse.Namespace) -> dict[str, Any]:
    models = ("tiny",) if args.quick else ("tiny", "small")
    return {m: _compare(m, "bfloat16", args.device, args.max_new, args.scale) for m in models}


def _big_model(args: argparse.Namespace) -> str:
    return tiny_model.path("tiny" if args.quick else "llama-1b-shape")


def check_offline(args: argparse.Namespace) -> dict[str, Any]:
    """Output tokens/s on the offline mix: pdserve (one generate call) vs transformers batches of 16."""
    path = _big_model(args)
    dtype = "float32" if args.device.type == "cpu" else "bfloat16"
    n = 8 if args.quick else args.requests
    llm = LLM(path, device=str(args.device), dtype=dtype, max_num_seqs=256, max_num_batched_tokens=8192)
    reqs = offline_mix(n, seed=0, vocab_size=llm.engine.vocab_size, scale=0.05 if args.quick else 1.0)
    params = [SamplingParams(temperature=0.0, max_tokens=r.max_tokens, ignore_eos=True) for r in reqs]
    llm.generate([list(r.prompt_token_ids[:32]) for r in reqs[:4]], SamplingParams(max_tokens=4))  # warm-up
    _sync(args.device)
    t0 = time.perf_counter()
    llm.generate([list(r.prompt_token_ids) for r in reqs], params)
    _sync(args.device)
    ours_s = time.perf_counter() - t0
    del llm
    model = _hf(path, getattr(torch, dtype), args.device)
    _hf_generate_batch(model, [reqs[0].prompt_token_ids[:32]], 4)
    _sync(args.device)
    t0 = time.perf_counter()
    for batch in hf_batches(reqs, 16, sort=False):
        _hf_generate_batch(model, [reqs[i].prompt_token_ids for i in batch], max(reqs[i].max_tokens for i in batch))
    _sync(args.device)
    hf_s = time.perf_counter() - t0
    useful = sum(r.max_tokens for r in reqs)
    return {"requests": n, "output_tokens": useful, "pdserve_s": ours_s, "hf_s": hf_s,
            "pdserve_tok_s": useful / ours_s, "hf_tok_s": useful / hf_s, "speedup": hf_s / ours_s}


def _copy_bandwidth(device: torch.device, nbytes: int) -> float:
    """Device-to-device copy rate in bytes/s (read + write counted), median of 5."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    times = []
    for _ in range(6):
        _sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * nbytes / statistics.median(times[1:])


def _decode_step(args: argparse.Namespace, path: str, dtype: str, seqs: int, context: int,
                 enforce_eager: bool) -> tuple[float, Any]:
    """Median seconds of a decode step with `seqs` sequences of `context` tokens, and the engine."""
    llm = LLM(path, device=str(args.device), dtype=dtype, max_num_seqs=seqs, max_num_batched_tokens=8192,
              enable_prefix_caching=False, enforce_eager=enforce_eager)
    engine = llm.engine
    g = torch.Generator().manual_seed(1)
    for i in range(seqs):
        engine.add_request(torch.randint(3, engine.vocab_size, (context,), generator=g).tolist(),
                           SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True), request_id=str(i))
    while any(r.num_output_tokens == 0 for r in engine.requests.values()):
        engine.step()
    times = []
    for _ in range(20 if not args.quick else 4):
        _sync(args.device)
        t0 = time.perf_counter()
        engine.step()
        _sync(args.device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), engine


def check_decode(args: argparse.Namespace) -> dict[str, Any]:
    """Decode step with 64 sequences of 1,024 tokens, eager and replaying CUDA graphs, against the HBM
    roofline: weight bytes + KV bytes read per step at the device-to-device copy rate measured here."""
    path = _big_model(args)
    dtype = "float32" if args.device.type == "cpu" else "bfloat16"
    seqs, context = (8, 64) if args.quick else (64, 1024)
    eager, engine = _decode_step(args, path, dtype, seqs, context, enforce_eager=True)
    weight_bytes = sum(p.numel() * p.element_size() for p in engine.model.parameters())
    kv_bytes = seqs * (context + 10) * engine.layout.bytes_per_block // engine.layout.block_size
    del engine
    graphs = None
    if args.device.type == "cuda":
        graphs, graph_engine = _decode_step(args, path, dtype, seqs, context, enforce_eager=False)
        assert graph_engine.runner.graphs is not None, "enforce_eager=False captured no graphs"
        del graph_engine
    bandwidth = _copy_bandwidth(args.device, 64 << 20 if args.quick else 2 << 30)
    roofline = (weight_bytes + kv_bytes) / bandwidth
    return {"sequences": seqs, "context": context, "weight_bytes": weight_bytes, "kv_bytes": kv_bytes,
            "copy_bandwidth_gb_s": bandwidth / 1e9, "roofline_ms": roofline * 1e3,
            "step_ms_eager": eager * 1e3, "eager_over_roofline": eager / roofline,
            "step_ms_graphs": None if graphs is None else graphs * 1e3,
            "graphs_over_roofline": None if graphs is None else graphs / roofline}


def _gemm_rate(device: torch.device, n: int, dtype: torch.dtype) -> float:
    """FLOP/s of an n x n x n matmul in dtype, median of 5."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    times = []
    for _ in range(6):
        _sync(device)
        t0 = time.perf_counter()
        a @ b
        _sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * n ** 3 / statistics.median(times[1:])


def check_prefill(args: argparse.Namespace) -> dict[str, Any]:
    """Prompt tokens/s of whole-prompt prefills as FLOP/s (2 x params per token) vs the GEMM rate."""
    path = _big_model(args)
    on_cpu = args.device.type == "cpu"
    dtype = "float32" if on_cpu else "bfloat16"
    num, length = (2, 64) if args.quick else (16, 2048)
    llm = LLM(path, device=str(args.device), dtype=dtype, max_num_seqs=num, max_num_batched_tokens=8192,
              enable_prefix_caching=False)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, llm.engine.vocab_size, (length,), generator=g).tolist() for _ in range(num)]
    params = SamplingParams(temperature=0.0, max_tokens=1)
    llm.generate(prompts[:1], params)  # warm-up: kernels compiled
    times = []
    for _ in range(3):
        _sync(args.device)
        t0 = time.perf_counter()
        llm.generate(prompts, params)
        _sync(args.device)
        times.append(time.perf_counter() - t0)
    params_count = sum(p.numel() for p in llm.engine.model.parameters())
    tokens_s = num * length / statistics.median(times)
    gemm = _gemm_rate(args.device, 1024 if args.quick else 8192, getattr(torch, dtype))
    return {"prompts": num, "prompt_len": length, "prompt_tokens_s": tokens_s, "params": params_count,
            "model_flop_s": 2 * params_count * tokens_s, "gemm_flop_s": gemm,
            "fraction_of_gemm": 2 * params_count * tokens_s / gemm}


CHECKS: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {
    "exact": check_exact, "bf16": check_bf16, "offline": check_offline, "decode": check_decode,
    "prefill": check_prefill,
}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="tiny shapes: check the script itself")
    parser.add_argument("--sections", default=",".join(SECTIONS))
    parser.add_argument("--max-new", type=int, default=32)
    parser.add_argument("--scale", type=int, default=8, help="the long prompt is 17 x scale tokens")
    parser.add_argument("--requests", type=int, default=128)
    parser.add_argument("--out", default=os.environ.get("OUT", "results"))
    args = parser.parse_args(argv)
    args.device = torch.device(args.device)
    results: dict[str, Any] = {"device": str(args.device), "torch": torch.__version__, "quick": args.quick,
                               "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    if args.device.type == "cuda":
        results["gpu"] = torch.cuda.get_device_name(args.device)
    for name in args.sections.split(","):
        t0 = time.perf_counter()
        try:
            results[name] = CHECKS[name](args)
        except Exception as exc:  # one section's failure is a result too; the rest still run
            results[name] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
        results[name]["seconds"] = time.perf_counter() - t0
        print(f"[{name}] {json.dumps(results[name], default=str)[:1500]}", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(results, indent=2, default=str))
    return results


if __name__ == "__main__":
    main()

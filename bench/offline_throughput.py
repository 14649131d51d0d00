"""Offline throughput: the pdserve engine vs transformers generate() on the same prompts.

    python -m bench.offline_throughput [--model small] [--requests 64] [--repeats 3] [--quick]
                                       [--threads 1] [--profile] [--out SECTION.md]

The workload is bench.workload.offline_mix (shared 220-token system prompt,
log-uniform user prompts of 20..2,000 tokens, 50 or 300 output tokens, half
each). Every request is greedy with EOS ignored, so each produces exactly its
max_tokens; only those tokens count as output ("useful") tokens.

Systems (each repeat runs every system in its own fresh subprocess, so peak
RSS is per system; the order rotates across repeats so drift on a shared box
spreads over all of them):
- pdserve:    engine.LLM with prefix caching, all requests in one generate() call;
- hf-arrival: transformers generate(), left-padded batches of 16 in arrival
              order, max_new_tokens = the largest max_tokens of the batch
              (tokens past a request's own max_tokens are waste, not counted);
- hf-sorted:  the same, batches sorted by (max_tokens, prompt length), so padding
              and over-generation are minimal: the strongest fair baseline.
- pdserve-noprefix: pdserve with prefix caching off.
- pdserve-torch-attention: pdserve with decode attention on the torch path (bucketed
              gather + SDPA) instead of the C kernel: what the kernel buys.
- pdserve-torch-linear: pdserve with torch's nn.Linear instead of oneDNN over packed
              weights: what packing buys.
- vllm, vllm-noprefix: vLLM's offline LLM.generate() (prefix caching on / off) on the
              same token ids, KV budget and batch limits, run by bench/vllm_offline.py in
              vLLM's own virtual environment ($VLLM_VENV, default ~/.venvs/vllm-cpu; make it
              with bench/vllm_peer.sh). Not in the default --systems.

Timed: the generation call(s) only, after model load (reported separately) and
a short warm-up. torch threads are pinned to the same number in every child.
Before timing, a check child compares pdserve's greedy tokens for the first
two requests with transformers' unpadded eager generate(); a mismatch is
printed loudly and recorded in the JSON.

Output: a markdown table on stdout and results/offline_throughput.json
(--out also writes the markdown section to a file). --profile runs pdserve
once more under torch.profiler and prints where its time goes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.workload import WorkloadRequest, offline_mix

SYSTEMS = ("pdserve", "hf-arrival", "hf-sorted")
# pdserve with one engine setting changed: what that part buys, measured side by side.
PDSERVE_VARIANTS: dict[str, dict[str, Any]] = {
    "pdserve": {},
    "pdserve-noprefix": {"enable_prefix_caching": False},
    "pdserve-torch-attention": {"attention_backend": "torch"},
    "pdserve-torch-linear": {"linear_backend": "torch"},
}
OPTIONAL_SYSTEMS = ("pdserve-noprefix", "pdserve-torch-attention", "pdserve-torch-linear", "vllm", "vllm-noprefix")
ALL_SYSTEMS = SYSTEMS + OPTIONAL_SYSTEMS
BASELINES = ("hf-arrival", "hf-sorted", *OPTIONAL_SYSTEMS)
VLLM_BLOCK_TOKENS = 128  # vLLM's CPU block size
VLLM_VENV = Path(os.environ.get("VLLM_VENV", Path.home() / ".venvs" / "vllm-cpu"))
RESULTS = Path("results") / "offline_throughput.json"
MiB = 1 << 20
DTYPE_BYTES = {"float32": 4, "bfloat16": 2}  # bytes per KV element


# ---- arguments and workload ---------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.offline_throughput", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="small", help="built-in model name (tiny, small, ...) or a local HF folder")
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scale", type=float, default=1.0, help="shrink every length of the mix (quick runs)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads, the same for every system")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPE_BYTES),
                   help="every system's weights, activations and KV (bfloat16: CPUs with native bfloat16 dot "
                        "products); the KV budget is sized in this dtype")
    p.add_argument("--hf-batch-size", type=int, default=16)
    p.add_argument("--kv-mib", type=int, default=0,
                   help="pdserve KV budget in MiB; 0 = enough for every request at once (no prefix sharing)")
    p.add_argument("--max-num-seqs", type=int, default=0, help="pdserve; 0 = the number of requests")
    p.add_argument("--max-num-batched-tokens", type=int, default=2048, help="pdserve per-step token budget")
    p.add_argument("--systems", default=",".join(SYSTEMS),
                   help=f"comma-separated, of {','.join(ALL_SYSTEMS)}")
    p.add_argument("--skip-check", action="store_true", help="skip the pdserve vs transformers correctness check")
    p.add_argument("--profile", action="store_true", help="also profile one pdserve run (not timed)")
    p.add_argument("--quick", action="store_true", help="tiny model, 8 requests, scale 0.1, 1 repeat")
    p.add_argument("--json", default=str(RESULTS), help="where to write the JSON results")
    p.add_argument("--out", default=None, help="also write the markdown section to this file")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: run one system, write JSON
    p.add_argument("--child-result", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.model, args.requests, args.scale, args.repeats = "tiny", 8, 0.1, 1
    systems = [s for s in args.systems.split(",") if s]
    unknown = set(systems) - set(ALL_SYSTEMS)
    if unknown or not systems:
        p.error(f"--systems must be a subset of {','.join(ALL_SYSTEMS)}, got {args.systems!r}")
    args.systems = systems
    return args


def model_path(name: str) -> str:
    """The local folder of any `model` setting (engine/models.py), made absolute: servers may run elsewhere."""
    from engine.models import resolve

    return os.path.abspath(resolve(name))


def model_config(path: str) -> dict[str, Any]:
    return json.loads((Path(path) / "config.json").read_text())


def build_workload(args: argparse.Namespace, vocab_size: int) -> list[WorkloadRequest]:
    return offline_mix(args.requests, seed=args.seed, vocab_size=vocab_size, scale=args.scale)


def workload_digest(reqs: list[WorkloadRequest]) -> str:
    h = hashlib.sha256()
    for r in reqs:
        h.update(json.dumps([r.request_id, r.product, list(r.prompt_token_ids), r.max_tokens]).encode())
    return h.hexdigest()[:16]


def kv_bytes_per_token(cfg: dict[str, Any], dtype_bytes: int = 4) -> int:
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    return 2 * cfg["num_hidden_layers"] * cfg.get("num_key_value_heads", heads) * head_dim * dtype_bytes


def kv_budget_bytes(reqs: list[WorkloadRequest], cfg: dict[str, Any], block_size: int = 16,
                    dtype_bytes: int = 4) -> int:
    """Enough blocks for every request in flight at once, the shared prefix counted per request (so the
    budget does not depend on prefix caching), plus one block each of slack; rounded up to 64 MiB."""
    blocks = sum(-(-(r.prompt_len + r.max_tokens) // block_size) + 1 for r in reqs)
    raw = blocks * block_size * kv_bytes_per_token(cfg, dtype_bytes)
    return -(-raw // (64 * MiB)) * (64 * MiB)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def current_rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MiB


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---- children: one system each ------------------------------------------------------------------
def _pin_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


def _pdserve_llm(args: argparse.Namespace, path: str, reqs: list[WorkloadRequest], cfg: dict[str, Any],
                 overrides: dict[str, Any] | None = None):
    from engine import LLM

    return LLM(path, dtype=args.dtype, kv_cache_bytes=_kv_bytes(args, reqs, cfg),
               max_num_seqs=args.max_num_seqs or len(reqs), max_num_batched_tokens=args.max_num_batched_tokens,
               **(overrides or {}))


def _kv_bytes(args: argparse.Namespace, reqs: list[WorkloadRequest], cfg: dict[str, Any]) -> int:
    return args.kv_mib * MiB if args.kv_mib else kv_budget_bytes(reqs, cfg, dtype_bytes=DTYPE_BYTES[args.dtype])


def _warmup_prompt(vocab_size: int, n: int) -> list[int]:
    # ids unrelated to the workload's (a fixed stride walk), so no prefix-cache hit is possible
    return [3 + (7919 * i + 11) % (vocab_size - 3) for i in range(n)]


def run_pdserve(args: argparse.Namespace, path: str, reqs: list[WorkloadRequest], cfg: dict[str, Any],
                profile: bool = False, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    from engine import SamplingParams

    t0 = time.perf_counter()
    llm = _pdserve_llm(args, path, reqs, cfg, overrides)
    load_s = time.perf_counter() - t0
    warm = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    llm.generate([_warmup_prompt(cfg["vocab_size"], 32), _warmup_prompt(cfg["vocab_size"], 20)[::-1]], warm)
    rss_loaded = peak_rss_mib()
    before = llm.stats()
    params = [SamplingParams(temperature=0.0, max_tokens=r.max_tokens, ignore_eos=True) for r in reqs]
    prompts = [list(r.prompt_token_ids) for r in reqs]
    prof_result = None
    if profile:
        prof_result, outs, wall = _profiled_generate(llm, prompts, params)
    else:
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params)
        wall = time.perf_counter() - t0
    after = llm.stats()
    tokens = [list(o.outputs[0].token_ids) for o in outs]
    bad = [r.request_id for r, t in zip(reqs, tokens, strict=True) if len(t) != r.max_tokens]
    if bad:
        _log(f"WARNING pdserve: {len(bad)} requests did not produce exactly max_tokens: {bad[:5]}")
    eng = llm.engine
    result = {
        "load_s": load_s,
        "wall_s": wall,
        "output_tokens": sum(min(len(t), r.max_tokens) for t, r in zip(tokens, reqs, strict=True)),
        "generated_tokens": after.num_generated_tokens - before.num_generated_tokens,
        "prompt_tokens_computed": after.prompt_tokens_computed - before.prompt_tokens_computed,
        "prompt_tokens_cached": after.prompt_tokens_cached - before.prompt_tokens_cached,
        "num_preemptions": after.num_preemptions - before.num_preemptions,
        "kv_cache_mib": eng.kv_cache.num_blocks * eng.layout.bytes_per_block / MiB,
        "kv_blocks": eng.kv_cache.num_blocks,
        "max_num_seqs": eng.config.max_num_seqs,
        "max_num_batched_tokens": eng.config.max_num_batched_tokens,
        "rss_after_load_mib": rss_loaded,
        "tokens": tokens,
    }
    if prof_result is not None:
        result["profile"] = prof_result
    return result


def _profiled_generate(llm, prompts, params):
    """llm.generate under torch.profiler, every step labelled by kind, and the time split into
    categories: matmuls / attention / gathers / ... inside the forward, plus the Python around it."""
    from torch.profiler import ProfilerActivity, profile, record_function

    runner = llm.engine.runner
    orig_forward, orig_step = runner.forward, llm.engine.step
    step_walls: dict[str, list[float]] = {"prefill": [], "decode": []}
    fwd_walls: dict[str, list[float]] = {"prefill": [], "decode": []}
    kind_of_step: list[str] = []

    def forward(batch):
        kind = "decode" if batch.ctx.num_decodes == len(batch.ctx.query_lens) else "prefill"
        kind_of_step.append(kind)
        t = time.perf_counter()
        with record_function(f"pdserve_forward_{kind}"):
            out = orig_forward(batch)
        fwd_walls[kind].append(time.perf_counter() - t)
        return out

    def step():
        n = len(kind_of_step)
        t = time.perf_counter()
        out = orig_step()
        if len(kind_of_step) > n:
            step_walls[kind_of_step[-1]].append(time.perf_counter() - t)
        return out

    runner.forward, llm.engine.step = forward, step
    try:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            outs = llm.generate(prompts, params)
            wall = time.perf_counter() - t0
    finally:
        runner.forward, llm.engine.step = orig_forward, orig_step
    return _profile_breakdown(prof, wall, step_walls, fwd_walls), outs, wall


_CATEGORIES = (  # (category, aten op names); the first match wins; unmatched ops are "other ops"
    ("matmul", {"aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear"}),
    ("attention (SDPA)", {"aten::_scaled_dot_product_flash_attention_for_cpu",
                          "aten::_scaled_dot_product_attention_math", "aten::scaled_dot_product_attention"}),
    ("KV gather", {"aten::index_select", "aten::index"}),
    ("KV write", {"aten::index_copy_", "aten::index_copy"}),
    ("GQA expand", {"aten::repeat_interleave"}),
    ("copies", {"aten::copy_", "aten::clone", "aten::contiguous", "aten::cat"}),
)


def _profile_breakdown(prof, wall: float, step_walls, fwd_walls) -> dict[str, Any]:
    """Self CPU time per (step kind, category), from the profiler's event tree."""
    totals: dict[str, dict[str, float]] = {"prefill": {}, "decode": {}}
    for ev in prof.events():
        if ev.name.startswith("pdserve_forward_"):
            continue
        kind, parent = None, ev.cpu_parent
        while parent is not None:
            if parent.name.startswith("pdserve_forward_"):
                kind = parent.name.rsplit("_", 1)[1]
                break
            parent = parent.cpu_parent
        if kind is None:
            continue
        cat = next((c for c, names in _CATEGORIES if ev.name in names), "other ops")
        totals[kind][cat] = totals[kind].get(cat, 0.0) + ev.self_cpu_time_total / 1e6
    out: dict[str, Any] = {"wall_s": wall, "kinds": {}}
    for kind in ("prefill", "decode"):
        step_s, fwd_s = sum(step_walls[kind]), sum(fwd_walls[kind])
        ops = totals[kind]
        ops_s = sum(ops.values())
        out["kinds"][kind] = {
            "steps": len(step_walls[kind]),
            "step_wall_s": step_s,
            "forward_wall_s": fwd_s,
            "ops_s": ops,
            # forward wall not covered by aten self time: module dispatch, Python in the model and hooks
            "forward_python_s": max(0.0, fwd_s - ops_s),
            # step wall outside the forward: scheduler, block tables, input tensors, sampler
            "engine_python_s": max(0.0, step_s - fwd_s),
        }
    out["outside_steps_s"] = max(0.0, wall - sum(sum(v) for v in step_walls.values()))
    return out


def hf_batches(reqs: list[WorkloadRequest], batch_size: int, sort: bool) -> list[list[int]]:
    """Request indices per batch: arrival order, or sorted by (max_tokens, prompt length)."""
    order = list(range(len(reqs)))
    if sort:
        order.sort(key=lambda i: (reqs[i].max_tokens, reqs[i].prompt_len))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def _hf_model(path: str, dtype: str, attn: str = "sdpa"):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype), attn_implementation=attn,
                                                local_files_only=True).eval()


def _hf_generate_batch(model, prompts: list[tuple[int, ...]], max_new_tokens: int):
    """Left-padded greedy generate() of one batch, EOS ignored. Returns ([B, max_new] new tokens, padded len)."""
    import torch

    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)  # pad id 0
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p):] = 1
    ids, mask = ids.to(model.device), mask.to(model.device)
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                             min_new_tokens=0, do_sample=False, pad_token_id=0, eos_token_id=None)
    return out[:, width:], width


def run_hf(args: argparse.Namespace, path: str, reqs: list[WorkloadRequest], cfg: dict[str, Any],
           sort: bool) -> dict[str, Any]:
    t0 = time.perf_counter()
    model = _hf_model(path, args.dtype)
    load_s = time.perf_counter() - t0
    _hf_generate_batch(model, [tuple(_warmup_prompt(cfg["vocab_size"], 32)),
                               tuple(_warmup_prompt(cfg["vocab_size"], 20))], 4)
    rss_loaded = peak_rss_mib()
    batches = hf_batches(reqs, args.hf_batch_size, sort)
    tokens: list[list[int] | None] = [None] * len(reqs)
    generated = prompt_computed = 0
    t0 = time.perf_counter()
    for batch in batches:
        max_new = max(reqs[i].max_tokens for i in batch)
        new, width = _hf_generate_batch(model, [reqs[i].prompt_token_ids for i in batch], max_new)
        for row, i in enumerate(batch):
            tokens[i] = new[row, : reqs[i].max_tokens].tolist()
        generated += new.numel()
        prompt_computed += width * len(batch)
    wall = time.perf_counter() - t0
    bad = [r.request_id for r, t in zip(reqs, tokens, strict=True) if len(t) != r.max_tokens]
    if bad:
        _log(f"WARNING transformers: {len(bad)} requests did not produce exactly max_tokens: {bad[:5]}")
    return {
        "load_s": load_s,
        "wall_s": wall,
        "output_tokens": sum(len(t) for t in tokens),
        "generated_tokens": generated,
        "prompt_tokens_computed": prompt_computed,  # padded prompt positions, all computed
        "num_batches": len(batches),
        "batch_size": args.hf_batch_size,
        "attn_implementation": model.config._attn_implementation,
        "rss_after_load_mib": rss_loaded,
        "tokens": tokens,
    }


def run_check(args: argparse.Namespace, path: str, reqs: list[WorkloadRequest], cfg: dict[str, Any],
              num: int = 2) -> dict[str, Any]:
    """pdserve (the benchmark's config) vs transformers' unpadded eager generate() on the first requests:
    greedy tokens must match; log-probabilities of the matched prefix are compared too."""
    import torch

    from engine import SamplingParams

    llm = _pdserve_llm(args, path, reqs, cfg)
    check = reqs[:num]
    outs = llm.generate([list(r.prompt_token_ids) for r in check],
                        [SamplingParams(temperature=0.0, max_tokens=r.max_tokens, ignore_eos=True, logprobs=0)
                         for r in check])
    del llm
    model = _hf_model(path, args.dtype, attn="eager")
    rows = []
    for r, o in zip(check, outs, strict=True):
        ours = list(o.outputs[0].token_ids)
        ours_lp = [lp[t] for lp, t in zip(o.outputs[0].logprobs, ours, strict=True)]
        with torch.inference_mode():
            g = model.generate(torch.tensor([r.prompt_token_ids]), max_new_tokens=r.max_tokens, do_sample=False,
                               pad_token_id=0, eos_token_id=None, output_logits=True, return_dict_in_generate=True)
        ref = g.sequences[0, r.prompt_len:].tolist()
        ref_lp = [float(torch.log_softmax(s[0].float(), -1)[t]) for s, t in zip(g.logits, ref, strict=True)]
        agree = next((i for i, (a, b) in enumerate(zip(ours, ref, strict=False)) if a != b), min(len(ours), len(ref)))
        lp_diff = max((abs(a - b) for a, b in zip(ours_lp[:agree], ref_lp[:agree], strict=True)), default=0.0)
        rows.append({"request_id": r.request_id, "prompt_len": r.prompt_len, "max_tokens": r.max_tokens,
                     "match": ours == ref, "first_mismatch": None if ours == ref else agree,
                     "max_abs_logprob_diff": lp_diff, "distinct_tokens": len(set(ref))})
    return {"ok": all(x["match"] for x in rows), "requests": rows}


def child_main(args: argparse.Namespace) -> None:
    _pin_threads(args.threads)
    path = model_path(args.model)
    cfg = model_config(path)
    reqs = build_workload(args, cfg["vocab_size"])
    if args.child in PDSERVE_VARIANTS:
        result = run_pdserve(args, path, reqs, cfg, overrides=PDSERVE_VARIANTS[args.child])
    elif args.child == "pdserve-profile":
        result = run_pdserve(args, path, reqs, cfg, profile=True)
    elif args.child in ("hf-arrival", "hf-sorted"):
        result = run_hf(args, path, reqs, cfg, sort=args.child == "hf-sorted")
    elif args.child == "check":
        result = run_check(args, path, reqs, cfg)
    else:
        raise SystemExit(f"unknown child {args.child!r}")
    import torch

    result.update(system=args.child, workload=workload_digest(reqs), threads=torch.get_num_threads(),
                  peak_rss_mib=peak_rss_mib())
    Path(args.child_result).write_text(json.dumps(result))


# ---- parent --------------------------------------------------------------------------------------
def _child_argv(args: argparse.Namespace, system: str, result_path: str) -> list[str]:
    argv = [sys.executable, "-m", "bench.offline_throughput", "--child", system, "--child-result", result_path,
            "--model", args.model, "--requests", str(args.requests), "--seed", str(args.seed),
            "--scale", repr(args.scale), "--threads", str(args.threads), "--hf-batch-size", str(args.hf_batch_size),
            "--kv-mib", str(args.kv_mib), "--max-num-seqs", str(args.max_num_seqs),
            "--max-num-batched-tokens", str(args.max_num_batched_tokens), "--dtype", args.dtype]
    return argv


def _vllm_child(args: argparse.Namespace, system: str, tmp: str, result_path: str) -> tuple[list[str], dict[str, str]]:
    """argv and extra environment of a vLLM child: the workload goes to it as a JSON spec."""
    python = VLLM_VENV / "bin" / "python"
    if not python.exists():
        raise SystemExit(f"{system}: no vLLM at {VLLM_VENV} (bench/vllm_peer.sh installs it; or set VLLM_VENV)")
    path = model_path(args.model)
    cfg = model_config(path)
    reqs = build_workload(args, cfg["vocab_size"])
    kv_bytes = _kv_bytes(args, reqs, cfg)
    spec = {"model": path, "prompts": [list(r.prompt_token_ids) for r in reqs],
            "max_tokens": [r.max_tokens for r in reqs],
            "warmup": [_warmup_prompt(cfg["vocab_size"], 32), _warmup_prompt(cfg["vocab_size"], 20)[::-1]],
            "kv_blocks": kv_bytes // (kv_bytes_per_token(cfg, DTYPE_BYTES[args.dtype]) * VLLM_BLOCK_TOKENS),
            "block_size": VLLM_BLOCK_TOKENS, "dtype": args.dtype,
            "max_num_seqs": args.max_num_seqs or len(reqs), "max_num_batched_tokens": args.max_num_batched_tokens,
            "prefix_caching": system == "vllm", "max_model_len": max(r.prompt_len + r.max_tokens for r in reqs) + 16,
            "echo": {"system": system, "workload": workload_digest(reqs), "threads": args.threads}}
    spec_path = os.path.join(tmp, "spec.json")
    Path(spec_path).write_text(json.dumps(spec))
    env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # the engine in the child itself: its RSS is measured
           "VLLM_CPU_OMP_THREADS_BIND": "0" if args.threads == 1 else f"0-{args.threads - 1}",
           "VLLM_CPU_KVCACHE_SPACE": str(max(1, -(-kv_bytes // (1 << 30)))),  # whole GiB, >= the budget
           "VLLM_LOGGING_LEVEL": "WARNING"}
    script = str(Path(__file__).resolve().parent / "vllm_offline.py")
    return [str(python), script, spec_path, result_path], env


def run_child(args: argparse.Namespace, system: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="pdserve-bench-") as tmp:
        result_path = os.path.join(tmp, "result.json")
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": str(args.threads),
               "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
        argv = _child_argv(args, system, result_path)
        if system.startswith("vllm"):
            argv, extra = _vllm_child(args, system, tmp, result_path)
            env.update(extra)
        load_before = os.getloadavg()[0]
        t0 = time.perf_counter()
        proc = subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{system} child failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
        result = json.loads(Path(result_path).read_text())
        result["process_s"] = time.perf_counter() - t0
        # the box is shared: record how busy it was (1-minute load average, 2 cores)
        result["loadavg_1m"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
        return result


def summarize(runs: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    summary = {}
    for system, rs in runs.items():
        tps = [r["output_tokens"] / r["wall_s"] for r in rs]
        summary[system] = {
            "repeats": len(rs),
            "output_tok_s_median": statistics.median(tps),
            "output_tok_s_all": tps,
            "wall_s_median": statistics.median(r["wall_s"] for r in rs),
            "wall_s_all": [r["wall_s"] for r in rs],
            "load_s_median": statistics.median(r["load_s"] for r in rs),
            "output_tokens": rs[0]["output_tokens"],
            "generated_tokens": rs[0]["generated_tokens"],
            "prompt_tokens_computed": rs[0]["prompt_tokens_computed"],
            "peak_rss_mib_max": max(r["peak_rss_mib"] for r in rs),
            "rss_after_load_mib_max": max(r["rss_after_load_mib"] for r in rs),
        }
    if "pdserve" in runs:
        base = runs["pdserve"]
        for system in BASELINES:
            if system not in runs:
                continue
            # paired per repeat (same round, adjacent in time) and of the medians
            paired = [(p["output_tokens"] / p["wall_s"]) / (b["output_tokens"] / b["wall_s"])
                      for p, b in zip(base, runs[system], strict=False)]
            summary[system]["ratio_pdserve_over_this"] = (summary["pdserve"]["output_tok_s_median"]
                                                          / summary[system]["output_tok_s_median"])
            summary[system]["ratio_paired_all"] = paired
    return summary


def agreement(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Greedy token agreement between systems (first repeat) and run-to-run determinism."""
    out: dict[str, Any] = {}
    if "pdserve" in runs:
        ours = runs["pdserve"][0]["tokens"]
        for system in BASELINES:
            if system in runs:
                theirs = runs[system][0]["tokens"]
                prefixes = [next((i for i, (a, b) in enumerate(zip(x, y, strict=False)) if a != b), len(x))
                            for x, y in zip(ours, theirs, strict=True)]
                out[f"pdserve_vs_{system}"] = {
                    "identical_requests": sum(x == y for x, y in zip(ours, theirs, strict=True)),
                    "requests": len(ours),
                    "mean_common_prefix_fraction": statistics.mean(
                        p / max(1, len(x)) for p, x in zip(prefixes, ours, strict=True)),
                }
    out["deterministic_across_repeats"] = {
        s: all(r["tokens"] == rs[0]["tokens"] for r in rs) for s, rs in runs.items()}
    return out


def markdown(args: argparse.Namespace, meta: dict[str, Any], summary: dict[str, dict[str, Any]]) -> str:
    names = {"pdserve": "pdserve (paged KV, prefix cache, continuous batching)",
             "pdserve-noprefix": "pdserve, prefix caching off",
             "pdserve-torch-attention": "pdserve, decode attention on the torch path (gather + SDPA)",
             "pdserve-torch-linear": "pdserve, linear layers on torch's nn.Linear (MKL, unpacked weights)",
             "vllm": "vLLM CPU LLM.generate(), prefix caching on",
             "vllm-noprefix": "vLLM CPU LLM.generate(), prefix caching off",
             "hf-arrival": f"transformers generate(), padded batches of {args.hf_batch_size}, arrival order",
             "hf-sorted": f"transformers generate(), padded batches of {args.hf_batch_size}, "
                          "sorted by (max_tokens, prompt len)"}
    lines = [
        "| system | output tok/s | wall s | pdserve / this | peak RSS MiB | prompt tokens computed "
        "| tokens generated (useful) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for system in args.systems:
        s = summary[system]
        ratio = s.get("ratio_pdserve_over_this")
        paired = s.get("ratio_paired_all")
        ratio_txt = "1.00" if system == "pdserve" else (
            f"{ratio:.2f} ({min(paired):.2f}-{max(paired):.2f})" if ratio else "-")
        lines.append(f"| {names[system]} | {s['output_tok_s_median']:.1f} | {_fmt_s(s['wall_s_median'])} | {ratio_txt} "
                     f"| {s['peak_rss_mib_max']:.0f} | {s['prompt_tokens_computed']:,} "
                     f"| {s['generated_tokens']:,} ({s['output_tokens']:,}) |")
    lines.append("")
    lines.append(f"Medians over {args.repeats} repeat(s); ratio = pdserve's median tok/s over this system's, "
                 "with the range of per-repeat paired ratios in brackets. Peak RSS is the largest over repeats "
                 "(ru_maxrss of each system's own process: model, KV cache, activations).")
    return "\n".join(lines)


def _fmt_s(seconds: float) -> str:
    return f"{seconds:.1f}" if seconds >= 10 else f"{seconds:.2f}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        child_main(args)
        return 0
    path = model_path(args.model)  # build the built-in weights once, before the children race to
    cfg = model_config(path)
    reqs = build_workload(args, cfg["vocab_size"])
    prompt_tokens = sum(r.prompt_len for r in reqs)
    meta = {
        "command": "python -m bench.offline_throughput " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "model": args.model, "model_path": path, "requests": args.requests, "seed": args.seed, "scale": args.scale,
        "repeats": args.repeats, "threads": args.threads, "hf_batch_size": args.hf_batch_size,
        "workload": workload_digest(reqs), "prompt_tokens": prompt_tokens,
        "output_tokens": sum(r.max_tokens for r in reqs),
        "products": {p: sum(r.product == p for r in reqs) for p in sorted({r.product for r in reqs})},
        "dtype": args.dtype, "kv_budget_mib": _kv_bytes(args, reqs, cfg) / MiB,
        "kv_bytes_per_token": kv_bytes_per_token(cfg, DTYPE_BYTES[args.dtype]),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
    }
    _log(f"workload {meta['workload']}: {len(reqs)} requests, {prompt_tokens:,} prompt tokens, "
         f"{meta['output_tokens']:,} output tokens, products {meta['products']}; "
         f"pdserve KV budget {meta['kv_budget_mib']:.0f} MiB; threads {args.threads}")
    check = None
    if args.dtype != "float32" and not args.skip_check:  # implementations round bfloat16 differently
        _log("correctness check skipped: greedy tokens are compared with transformers in float32 only")
    elif not args.skip_check:
        check = run_child(args, "check")
        status = "OK" if check["ok"] else "MISMATCH"
        _log(f"correctness check (first {len(check['requests'])} requests, pdserve vs transformers eager, "
             f"unpadded): {status} {check['requests']}")
        if not check["ok"]:
            _log("!" * 78 + "\n!!! pdserve's greedy output differs from transformers' on the first requests !!!\n"
                 + "!" * 78)
    runs: dict[str, list[dict[str, Any]]] = {s: [] for s in args.systems}
    for rep in range(args.repeats):
        order = args.systems[rep % len(args.systems):] + args.systems[: rep % len(args.systems)]
        for system in order:
            r = run_child(args, system)
            if r["workload"] != meta["workload"]:
                raise RuntimeError(f"{system} child generated a different workload")
            runs[system].append(r)
            _log(f"repeat {rep + 1}/{args.repeats} {system}: {r['output_tokens'] / r['wall_s']:.1f} output tok/s, "
                 f"wall {r['wall_s']:.1f} s, load {r['load_s']:.1f} s, peak RSS {r['peak_rss_mib']:.0f} MiB, "
                 f"loadavg {r['loadavg_1m']}")
    summary = summarize(runs)
    agree = agreement(runs)
    profile = None
    if args.profile:
        profile = run_child(args, "pdserve-profile")["profile"]
        _log(json.dumps(profile, indent=1))
    table = markdown(args, meta, summary)
    print(table)
    print(f"\ncommand: {meta['command']}")
    if check is not None:
        print(f"correctness check: {'OK' if check['ok'] else 'MISMATCH'}")
    print(f"agreement: {json.dumps(agree)}")
    for r in runs.values():
        for x in r:
            x.pop("tokens", None)
    report = {"meta": meta, "check": check, "summary": summary, "agreement": agree, "runs": runs, "profile": profile}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=1))
    if args.out:
        Path(args.out).write_text(f"Command: `{meta['command']}` ({meta['date']})\n\n{table}\n")
    return 0 if check is None or check["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

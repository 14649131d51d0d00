"""vLLM's offline throughput on a workload file: the child bench/offline_throughput.py runs in vLLM's own
virtual environment (so this file imports only the standard library and vllm, never pdserve).

    $VLLM_VENV/bin/python bench/vllm_offline.py SPEC.json RESULT.json

SPEC: {"model": folder, "prompts": [[token ids]], "max_tokens": [n], "warmup": [[token ids]],
       "kv_blocks": vLLM blocks (of block_size tokens), "block_size": tokens, "max_num_seqs": n,
       "max_num_batched_tokens": n, "prefix_caching": bool, "max_model_len": tokens, "dtype": "float32" (the
       default) or "bfloat16", "echo": {...}}
RESULT: the fields offline_throughput's children report (seconds, tokens, MiB), plus every request's
output token ids. Greedy, EOS ignored: each request makes exactly its max_tokens. The engine runs in
this process (VLLM_ENABLE_V1_MULTIPROCESSING=0, set by the caller), so ru_maxrss covers it.
"""

from __future__ import annotations

import json
import resource
import sys
import time


def main(spec_path: str, result_path: str) -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    spec = json.loads(open(spec_path).read())
    t0 = time.perf_counter()
    llm = LLM(model=spec["model"], dtype=spec.get("dtype", "float32"), enforce_eager=True, seed=0,
              max_model_len=spec["max_model_len"], block_size=spec["block_size"],
              num_gpu_blocks_override=spec["kv_blocks"], max_num_seqs=spec["max_num_seqs"],
              max_num_batched_tokens=spec["max_num_batched_tokens"],
              enable_prefix_caching=spec["prefix_caching"])
    load_s = time.perf_counter() - t0
    warm = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    llm.generate([TokensPrompt(prompt_token_ids=p) for p in spec["warmup"]], warm, use_tqdm=False)
    rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    prompts = [TokensPrompt(prompt_token_ids=p) for p in spec["prompts"]]
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in spec["max_tokens"]]
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    wall = time.perf_counter() - t0
    tokens = [list(o.outputs[0].token_ids) for o in outs]
    cached = sum(getattr(o, "num_cached_tokens", 0) or 0 for o in outs)
    prompt_tokens = sum(len(p) for p in spec["prompts"])
    result = {
        "load_s": load_s, "wall_s": wall,
        "output_tokens": sum(min(len(t), n) for t, n in zip(tokens, spec["max_tokens"], strict=True)),
        "generated_tokens": sum(len(t) for t in tokens),
        "prompt_tokens_computed": prompt_tokens - cached, "prompt_tokens_cached": cached,
        "kv_blocks": spec["kv_blocks"], "max_num_seqs": spec["max_num_seqs"],
        "max_num_batched_tokens": spec["max_num_batched_tokens"], "rss_after_load_mib": rss_loaded,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "vllm_version": __import__("vllm").__version__, "tokens": tokens,
        **spec.get("echo", {}),  # the caller's own bookkeeping (system, workload digest, threads)
    }
    open(result_path, "w").write(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

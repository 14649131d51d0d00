"""The `pdserve` command line."""

from __future__ import annotations

import argparse
import sys
import time


def _demo(args: argparse.Namespace) -> int:
    """Offline generation on the built-in model: the engine end to end, no cluster."""
    from engine import LLM, SamplingParams

    llm = LLM(args.model)
    system = "You are the support assistant of a company that runs language models for its customers. "
    prompts = [system + q for q in ("How do I reset my password?", "Why was my invoice higher this month?",
                                    "Write a short report on cache usage.", "What is paged attention?")]
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    for out in outputs:
        print(f"--- prompt ({len(out.prompt_token_ids)} tokens, {out.num_cached_tokens} cached)")
        print(f"{out.prompt!r}\n=> {out.outputs[0].text!r} [{out.outputs[0].finish_reason}]")
    stats = llm.stats()
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    print(f"\n{tokens} tokens in {elapsed:.2f} s; prompt tokens computed {stats.prompt_tokens_computed}, "
          f"from cache {stats.prompt_tokens_cached}; KV blocks free {stats.num_blocks_free}/{stats.num_blocks_total}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pdserve", description="Disaggregated LLM serving on Ray")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="offline generation with the built-in model (no cluster)")
    demo.add_argument("--model", default=None, help="local Hugging Face folder (default: built-in tiny model)")
    demo.add_argument("--max-tokens", type=int, default=32)
    demo.set_defaults(func=_demo)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

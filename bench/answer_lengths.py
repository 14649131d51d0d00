"""How long a served model's real answers are: each product's own questions, EOS honoured.

    python -m bench.answer_lengths                          # the shipped products and model
    python -m bench.answer_lengths --model tiny --quick     # a smoke run (tests/test_answer_lengths.py)

The load benchmarks fix every output's length (ignore_eos) so that two servers do the same work. This
one measures what they leave out: how many tokens the model writes before it ends on its own. Real
questions (a support agent's, a report writer's) go through the products' system prompt and the
model's chat template, offline on the engine, greedy and sampled (temperature 0.7, seeded), with each
product's output cap from the workload (the top of its output range: support-chat 60, report-gen
1,536 tokens). Reported per product and setting: the output tokens' mean, median and P90, and how
many answers ended on EOS rather than at the cap.
"""

from __future__ import annotations

import argparse
import statistics
import time

from bench.workload import CHAT_OUTPUTS, REPORT_GEN, SUPPORT_CHAT
from cluster.app import DEFAULT_PRODUCTS_DIR
from cluster.products import load_products
from engine import LLM, SamplingParams

QUESTIONS: dict[str, tuple[str, ...]] = {
    SUPPORT_CHAT: (
        "How do I rotate an API key?",
        "When are invoices issued?",
        "Why was my request rate limited?",
        "Which regions can I run models in?",
        "How long do you keep my prompts?",
        "Can I get a refund for last month?",
        "My dashboard shows an error 503. What should I do?",
        "How do I upgrade to a newer model version?",
    ),
    REPORT_GEN: (
        "Write a report on our API usage in November.",
        "Write a report on the causes of last week's outage.",
        "Write a report comparing our costs in two regions.",
        "Write a quarterly report on customer support tickets.",
        "Write a report on how to reduce our monthly API spend.",
        "Write a report on rate limit errors over the last month.",
        "Write a report on data retention settings across our teams.",
        "Write a report on the adoption of the newest model version.",
    ),
}
SETTINGS = {"greedy": {"temperature": 0.0}, "temperature 0.7": {"temperature": 0.7, "seed": 0}}


def run(model: str | None, caps: dict[str, int], threads: int) -> list[dict]:
    """One row per (product, setting): output-length statistics in tokens."""
    products = load_products(DEFAULT_PRODUCTS_DIR)
    llm = LLM(model or products[SUPPORT_CHAT].model, num_threads=threads)
    rows = []
    for setting, kwargs in SETTINGS.items():
        for product, questions in QUESTIONS.items():
            system = products[product].system_prompt
            prompts = [llm.tokenizer.apply_chat_template(
                [{"role": "system", "content": system}, {"role": "user", "content": q}],
                add_generation_prompt=True, tokenize=True, return_dict=False) for q in questions]
            params = SamplingParams(max_tokens=caps[product], **kwargs)
            start = time.perf_counter()
            outputs = [o.outputs[0] for o in llm.generate(prompts, params)]
            lengths = sorted(len(o.token_ids) for o in outputs)
            rows.append({"product": product, "setting": setting, "answers": len(lengths), "cap": caps[product],
                         "mean": statistics.mean(lengths), "median": statistics.median(lengths),
                         "p90": lengths[min(len(lengths) - 1, int(0.9 * len(lengths)))],
                         "ended_on_eos": sum(o.finish_reason == "stop" for o in outputs),
                         "seconds": time.perf_counter() - start})
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| product | setting | answers | cap | mean | median | P90 | ended on EOS |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['product']} | {r['setting']} | {r['answers']} | {r['cap']} | {r['mean']:.1f} | {r['median']:.0f} "
              f"| {r['p90']} | {r['ended_on_eos']}/{r['answers']} |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="a `model:` setting (default: the shipped products' model)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="caps of 8 tokens: a smoke run")
    args = p.parse_args(argv)
    caps = {name: 8 for name in QUESTIONS} if args.quick else {name: hi for name, (_, hi) in CHAT_OUTPUTS.items()}
    rows = run(args.model, caps, args.threads)
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Valid-but-extreme OpenAI requests, and the check of what pdserve answers them.

The edges of what the API takes: subnormal, tiny and huge floats in every float field, integers at and
past their limits, seeds past 64 bits, `n` up to its limit, four stop strings, `logprobs` /
`top_logprobs` up to 20, non-ASCII text everywhere (prompts, stops, cache salts), prompts as token ids.
A value past an edge may be refused (4xx); anything else must be answered well-formed; nothing may 5xx.
tests/test_http_extremes.py draws these with Hypothesis; bench/hardening.py with a seeded random
generator, beside load and a replica kill.
"""

from __future__ import annotations

import http.client
import json
import random
import urllib.parse
from typing import Any

from cluster.openai_protocol import MAX_LOGPROBS, MAX_N, MAX_STOP_SEQUENCES

FLOAT_EDGES = [0.0, 5e-324, 2.2250738585072014e-308, 1e-38, 1e-6, 1.0, 2.0, 1e308, float("inf")]
UNIT_EDGES = [5e-324, 1e-300, 1e-6, 0.5, 1.0]
INT_EDGES = [0, 1, 20, 2**31 - 1, 2**63 - 1, 2**63, 2**64 + 1, 10**40]
TOP_K_EDGES = [0, 1, 2, 8191, 8192, 10**6, 10**6 + 1]
ROLES = ["user", "assistant", "system", "developer"]
TEXTS = ["x", "naïve café", "日本語のテキスト", "😀🚀", "مرحبا بالعالم", "\u200b\u00a0", "a\nb\tc", "ẞ" * 24,
         "Ω≈ç√∫", "\U0001F9D1\u200D\U0001F680"]


def random_request(rng: random.Random, products: list[str], vocab: int) -> tuple[str, str, dict[str, Any]]:
    """(route, product, body): one extreme request, drawn with rng."""
    chat = rng.random() < 0.5
    body: dict[str, Any] = {"model": rng.choice(products), "max_tokens": rng.randint(1, 6),
                            "ignore_eos": rng.random() < 0.5, "n": rng.randint(1, MAX_N)}
    for name, edges, span in (("temperature", FLOAT_EDGES, (0.0, 2.0)), ("top_p", UNIT_EDGES, (1e-300, 1.0))):
        if rng.random() < 0.5:
            body[name] = rng.choice(edges) if rng.random() < 0.7 else rng.uniform(*span)
    if rng.random() < 0.5:
        body["top_k"] = rng.choice(TOP_K_EDGES)
    if rng.random() < 0.5:
        body["seed"] = rng.choice(INT_EDGES) if rng.random() < 0.7 else rng.randrange(2**64)
    if rng.random() < 0.5:
        body["stop"] = rng.sample(TEXTS, rng.randint(1, MAX_STOP_SEQUENCES))
    if rng.random() < 0.3:
        body["cache_salt"] = rng.choice(TEXTS)
    if rng.random() < 0.5:
        body.update({"logprobs": True, "top_logprobs": rng.randint(0, MAX_LOGPROBS)} if chat
                    else {"logprobs": rng.randint(0, MAX_LOGPROBS)})
    if rng.random() < 0.5:
        body.update(stream=True, stream_options={"include_usage": rng.random() < 0.5})
    if chat:
        body["messages"] = [{"role": rng.choice(ROLES), "content": rng.choice(TEXTS)}
                            for _ in range(rng.randint(1, 3))]
        return "/v1/chat/completions", body["model"], body
    body["prompt"] = (rng.choice(TEXTS) if rng.random() < 0.5
                      else [rng.randrange(vocab) for _ in range(rng.randint(1, 64))])
    return "/v1/completions", body["model"], body


def send(base: str, path: str, api_key: str, body: dict, timeout_s: float = 120) -> tuple[int, bytes]:
    """POST body to base + path (base: http://host:port, no /v1); (status, raw response body)."""
    parts = urllib.parse.urlsplit(base)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout_s)
    try:
        conn.request("POST", parts.path + path, body=json.dumps(body).encode(),
                     headers={"Content-Type": "application/json", "Authorization": f"Bearer {api_key}"})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def answer_problem(body: dict, status: int, raw: bytes) -> str | None:
    """What is wrong with the answer to body (None: nothing). A 5xx is wrong; a 4xx must carry an error
    message; a 200 must hold n choices (logprobs for each, when asked), and a stream must end with [DONE],
    carry no error event and finish every choice."""
    if status >= 500:
        return f"{status}: {raw[:300]!r}"
    if status != 200:
        return None if json.loads(raw).get("error", {}).get("message") else f"{status} without a message"
    n = body.get("n", 1)
    if not body.get("stream"):
        choices = json.loads(raw)["choices"]
        if len(choices) != n:
            return f"{len(choices)} choices for n={n}"
        if body.get("logprobs") not in (None, False) and not all(c["logprobs"] for c in choices):
            return "logprobs asked for, not given"
        return None
    events = [line[6:] for line in raw.decode().split("\n") if line.startswith("data: ")]
    if not events or events[-1] != "[DONE]":
        return f"stream without [DONE]: {raw[-200:]!r}"
    chunks = [json.loads(e) for e in events[:-1]]
    if any("error" in c for c in chunks):
        return f"stream error event: {[c for c in chunks if 'error' in c][:1]}"
    finished = {c["choices"][0]["index"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]}
    return None if finished == set(range(n)) else f"choices finished: {sorted(finished)} of n={n}"

"""A deterministic generator of WORKLOAD.md's two-product mix, as token ids.

Two products share one model and one system prompt:
- "support-chat": short answers (50 output tokens by default);
- "report-gen": long reports (WORKLOAD.md says ~1,500 output tokens; the
  offline benchmark scales that down to 300 by default).

Every prompt is the same shared system prompt (`system_prompt_tokens` ids)
followed by a user prompt whose length is drawn **log-uniformly** in
`user_tokens` (inclusive): real prompt lengths are heavy-tailed, many short
and few long, and log-uniform is the simplest distribution of that shape
(median ~200 tokens for 20..2,000, mean ~430). It also means padded batches
carry a lot of padding; the sorted-batch baseline in bench/ removes most of it.

Products are exactly balanced (round-robin over `outputs`, so an odd count
gives the first product one more) and shuffled by the seed, so arrival order mixes them. Token ids are drawn
uniformly from [3, vocab_size): ids 0-2 are the built-in models' special
tokens. Everything is a pure function of the arguments (Python's
`random.Random(seed)`, stable across platforms and Python versions).

`scale` multiplies every length (system prompt, user range, outputs; each
rounded and kept >= 1) for quick runs, keeping the shape of the mix.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from dataclasses import dataclass

SUPPORT_CHAT = "support-chat"
REPORT_GEN = "report-gen"
DEFAULT_OUTPUTS: Mapping[str, int] = {SUPPORT_CHAT: 50, REPORT_GEN: 300}
FIRST_REGULAR_TOKEN = 3  # 0 <|endoftext|>, 1 <|im_start|>, 2 <|im_end|>


@dataclass(frozen=True)
class WorkloadRequest:
    request_id: str
    product: str
    prompt_token_ids: tuple[int, ...]
    max_tokens: int

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_token_ids)


def _scaled(n: int, scale: float) -> int:
    return max(1, round(n * scale))


def offline_mix(num_requests: int, seed: int, vocab_size: int, system_prompt_tokens: int = 220,
                user_tokens: tuple[int, int] = (20, 2000), outputs: Mapping[str, int] = DEFAULT_OUTPUTS,
                scale: float = 1.0) -> list[WorkloadRequest]:
    """`num_requests` requests in arrival order, all sharing one system prompt.

    outputs maps product name -> max_tokens; the products split the requests
    evenly. Lengths are in tokens; user prompt lengths are log-uniform in
    `user_tokens` (both ends inclusive), after scaling.
    """
    if num_requests < 0:
        raise ValueError(f"num_requests must be >= 0, got {num_requests}")
    if vocab_size <= FIRST_REGULAR_TOKEN:
        raise ValueError(f"vocab_size must be > {FIRST_REGULAR_TOKEN}, got {vocab_size}")
    if scale <= 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    if not outputs:
        raise ValueError("outputs must name at least one product")
    lo, hi = _scaled(user_tokens[0], scale), _scaled(user_tokens[1], scale)
    if lo > hi:
        raise ValueError(f"user_tokens must be (min, max) with min <= max, got {user_tokens}")
    rng = random.Random(seed)

    def tokens(n: int) -> tuple[int, ...]:
        return tuple(rng.randrange(FIRST_REGULAR_TOKEN, vocab_size) for _ in range(n))

    system = tokens(_scaled(system_prompt_tokens, scale)) if system_prompt_tokens > 0 else ()
    names = list(outputs)
    products = [names[i % len(names)] for i in range(num_requests)]
    rng.shuffle(products)
    requests = []
    for i, product in enumerate(products):
        # log-uniform on [lo, hi + 1), floored: every integer in [lo, hi] is reachable
        n = min(hi, int(math.exp(rng.uniform(math.log(lo), math.log(hi + 1)))))
        requests.append(WorkloadRequest(request_id=f"req-{i}", product=product,
                                        prompt_token_ids=system + tokens(n),
                                        max_tokens=_scaled(outputs[product], scale)))
    return requests

"""A deterministic generator of the two-product mix (support chat, report generator), as token ids.

Two products share one model and one system prompt:
- "support-chat": short answers (50 output tokens by default);
- "report-gen": long reports (about 1,500 output tokens; the
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

`chat_requests` is the same mix as chat messages for HTTP benchmarks (see its
docstring): text, not token ids, so every OpenAI-compatible server gets the
same requests.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from bench.prompt_text import ChatTokenizer, builtin_tokenizer, chat_prompt_len, word_bank

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


def _log_uniform(rng: random.Random, lo: int, hi: int) -> int:
    # log-uniform on [lo, hi + 1), floored: every integer in [lo, hi] is reachable
    return min(hi, int(math.exp(rng.uniform(math.log(lo), math.log(hi + 1)))))


def _uniform_int(rng: random.Random, lo: int, hi: int) -> int:
    # One rng.random() per draw (randint's rejection sampling takes a variable number), so a scaled
    # mix consumes the random stream exactly like the full one and keeps the same products and lengths.
    return min(hi, lo + int(rng.random() * (hi - lo + 1)))


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
        n = _log_uniform(rng, lo, hi)
        requests.append(WorkloadRequest(request_id=f"req-{i}", product=product,
                                        prompt_token_ids=system + tokens(n),
                                        max_tokens=_scaled(outputs[product], scale)))
    return requests


# ---- the mix as chat requests, with arrivals (HTTP benchmarks) ---------------------------------------

PRODUCTS_DIR = Path(__file__).resolve().parent.parent / "deploy" / "products"
# Output tokens (inclusive ranges) per product: the workload's "about 50" and "about 1,500", each with a
# mean of exactly that. report-gen stays <= 1,536, its product's max_output_tokens (deploy/products).
CHAT_OUTPUTS: Mapping[str, tuple[int, int]] = {SUPPORT_CHAT: (40, 60), REPORT_GEN: (1464, 1536)}


@dataclass(frozen=True)
class Poisson:
    """Open loop: requests arrive at `rate` per second, exponential gaps (mean 1/rate seconds)."""

    rate: float

    def __post_init__(self) -> None:
        if not self.rate > 0:
            raise ValueError(f"rate must be > 0 requests/s, got {self.rate}")


@dataclass(frozen=True)
class Concurrency:
    """Closed loop: `concurrency` requests in flight, the next one sent when one ends (no arrival times)."""

    concurrency: int

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {self.concurrency}")


Arrival = Poisson | Concurrency


@dataclass(frozen=True)
class ProductMix:
    """One product's part of the mix: its share (relative weight), system prompt and output range (tokens)."""

    name: str
    weight: float
    system_prompt: str
    output_tokens: tuple[int, int]

    def __post_init__(self) -> None:
        if self.weight < 0:
            raise ValueError(f"{self.name}: weight must be >= 0, got {self.weight}")
        lo, hi = self.output_tokens
        if not 1 <= lo <= hi:
            raise ValueError(f"{self.name}: output_tokens must be (min, max) with 1 <= min <= max, got {lo, hi}")


@dataclass(frozen=True)
class ChatMix:
    """Products, user prompt range (tokens, log-uniform, inclusive) and a scale for lengths.

    `scale` multiplies the user range and every output range (rounded, kept >= 1), not the system
    prompts: a server such as pdserve adds its product's system prompt itself, so the client cannot
    shorten it. Scale the system prompt by configuring shorter ones (ProductMix.system_prompt).
    """

    products: tuple[ProductMix, ...]
    user_tokens: tuple[int, int] = (20, 2000)
    scale: float = 1.0

    def __post_init__(self) -> None:
        if not self.products or sum(p.weight for p in self.products) <= 0:
            raise ValueError("the mix needs at least one product with weight > 0")
        if len({p.name for p in self.products}) != len(self.products):
            raise ValueError("product names must be unique")
        if self.scale <= 0:
            raise ValueError(f"scale must be > 0, got {self.scale}")
        if not 1 <= self.user_tokens[0] <= self.user_tokens[1]:
            raise ValueError(f"user_tokens must be (min, max) with 1 <= min <= max, got {self.user_tokens}")

    def scaled(self, tokens: tuple[int, int]) -> tuple[int, int]:
        return _scaled(tokens[0], self.scale), _scaled(tokens[1], self.scale)


def default_mix(weights: Mapping[str, float] | None = None, scale: float = 1.0,
                products_dir: str | Path = PRODUCTS_DIR) -> ChatMix:
    """The two-product mix with the products' own system prompts (deploy/products/*.yaml).

    weights: product -> relative share of requests (default 1:1).
    """
    from cluster.products import load_products

    configs = load_products(products_dir)
    weights = dict(weights) if weights is not None else {name: 1.0 for name in CHAT_OUTPUTS}
    unknown = set(weights) - set(CHAT_OUTPUTS) - set(configs)
    if unknown:
        raise ValueError(f"unknown products in weights: {sorted(unknown)}")
    products = tuple(ProductMix(name, weights.get(name, 0.0), configs[name].system_prompt, CHAT_OUTPUTS[name])
                     for name in CHAT_OUTPUTS)
    return ChatMix(products=products, scale=scale)


@dataclass(frozen=True)
class ChatRequest:
    """One chat request. Lengths in tokens of the tokenizer it was built with; arrival_s in seconds after the start."""

    request_id: str
    product: str
    system: str
    user: str
    user_tokens: int
    prompt_tokens: int  # system + user through the chat template, with the assistant header
    max_tokens: int
    arrival_s: float | None  # None: closed loop (Concurrency)

    def messages(self, include_system: bool = True) -> list[dict[str, str]]:
        """OpenAI chat messages; include_system=False when the server adds the product's system prompt."""
        user = {"role": "user", "content": self.user}
        return [{"role": "system", "content": self.system}, user] if include_system else [user]


def chat_requests(mix: ChatMix, arrival: Arrival, seed: int,
                  tokenizer: ChatTokenizer | None = None) -> Iterator[ChatRequest]:
    """An endless, seeded stream of the mix's requests; take as many as a run needs.

    Request i is a pure function of (mix, seed, i, tokenizer): the same whatever the arrival process
    and however many are taken, so every system and every load level sees the same requests. Products
    are drawn independently with the mix's weights; user prompts are log-uniform in the scaled range
    and made of single-token words (bench/prompt_text.py), so they tokenize to exactly `user_tokens`;
    outputs are uniform in the product's scaled range. Poisson arrivals come from their own random
    stream, so the rate changes when requests arrive, never what they are.
    """
    tokenizer = tokenizer or builtin_tokenizer()
    bank = word_bank(tokenizer)
    # The template adds the same tokens around any user text, so one count per product gives every length.
    frame = {p.name: chat_prompt_len(tokenizer, p.system_prompt, "") for p in mix.products}
    by_name = {p.name: p for p in mix.products}
    names, weights = list(by_name), [p.weight for p in mix.products]
    lo, hi = mix.scaled(mix.user_tokens)
    shape, gaps = random.Random(f"{seed}:shape"), random.Random(f"{seed}:arrivals")
    clock = 0.0
    for i in itertools.count():
        product = by_name[shape.choices(names, weights)[0]]
        n = _log_uniform(shape, lo, hi)
        max_tokens = _uniform_int(shape, *mix.scaled(product.output_tokens))
        arrival_s = None
        if isinstance(arrival, Poisson):
            clock += gaps.expovariate(arrival.rate)
            arrival_s = clock
        user = bank.text(n, random.Random(f"{seed}:text:{i}"))
        yield ChatRequest(request_id=f"req-{i}", product=product.name, system=product.system_prompt, user=user,
                          user_tokens=n, prompt_tokens=frame[product.name] + n, max_tokens=max_tokens,
                          arrival_s=arrival_s)

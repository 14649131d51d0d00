"""A product as this ingress replica serves it: its config, tokenizer and limits, admission and statistics."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from transformers import AutoTokenizer

from cluster.admission import Admission
from cluster.metric_names import (
    E2E_REQUEST_LATENCY,
    INGRESS_INFLIGHT,
    INTER_TOKEN_LATENCY,
    MIGRATIONS,
    OVERLOAD_SPILLS,
    REQUEST_SUCCESS,
    REQUESTS_REJECTED,
    TIME_TO_FIRST_TOKEN,
    TOKEN_STREAMS_OPEN,
)
from cluster.metric_snapshots import Histogram, MetricsSnapshot
from cluster.products import ProductConfig
from engine.engine import context_limit
from engine.model import load_config, vocab_size
from engine.models import resolve as resolve_model


@dataclass
class ProductStats:
    """A product's request statistics on this replica, cumulative: latencies in seconds, counts in requests."""

    ttft: Histogram = field(default_factory=lambda: Histogram.for_metric(TIME_TO_FIRST_TOKEN))
    itl: Histogram = field(default_factory=lambda: Histogram.for_metric(INTER_TOKEN_LATENCY))
    e2e: Histogram = field(default_factory=lambda: Histogram.for_metric(E2E_REQUEST_LATENCY))
    finished: Counter = field(default_factory=Counter)  # finish reason -> requests
    rejected: Counter = field(default_factory=Counter)  # reason -> requests refused before any work
    migrations: int = 0  # samples resumed on another decode replica (theirs died)
    spills: int = 0  # samples tried on another decode replica (an engine refused them for load)

    def count_migration(self) -> None:
        self.migrations += 1

    def count_spill(self) -> None:
        self.spills += 1


@dataclass
class ServedProduct:
    """One product on this replica: what preparing its requests needs, its admission and its statistics."""

    config: ProductConfig
    tokenizer: Any
    max_model_len: int  # tokens: the longest request (prompt + max_tokens) every engine it passes can hold
    vocab_size: int  # prompt token ids must be below it: the model's own, as the engines check it
    keys: frozenset[str]  # Bearer keys; empty: open
    system_prefix: list[int]  # token ids of the rendered system turn: shared by all chat requests
    stats: ProductStats = field(default_factory=ProductStats)
    admission: Admission = field(init=False)  # bounded by config.max_queue_len

    def __post_init__(self) -> None:
        self.admission = Admission(self.config.name, self.config.max_queue_len)

    def snapshot(self, token_streams_open: int) -> MetricsSnapshot:
        """The product's metrics for the hub; token_streams_open: its streams open on this replica."""
        stats = self.stats
        return MetricsSnapshot(
            histograms={TIME_TO_FIRST_TOKEN: stats.ttft.snapshot(), INTER_TOKEN_LATENCY: stats.itl.snapshot(),
                        E2E_REQUEST_LATENCY: stats.e2e.snapshot()},
            counters={MIGRATIONS: float(stats.migrations), OVERLOAD_SPILLS: float(stats.spills)},
            labelled_counters={REQUEST_SUCCESS: dict(stats.finished), REQUESTS_REJECTED: dict(stats.rejected)},
            gauges={INGRESS_INFLIGHT: float(self.admission.inflight), TOKEN_STREAMS_OPEN: float(token_streams_open)})


def load_product(config: ProductConfig) -> ServedProduct:
    """The product with its tokenizer (local files only), rendered system turn and context limit."""
    path = resolve_model(config.engine_config().model)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    prefix: list[int] = []
    if config.system_prompt:
        prefix = tokenizer.apply_chat_template([{"role": "system", "content": config.system_prompt}],
                                               tokenize=True, return_dict=False)
    hf_config = load_config(path)
    # A request must fit every engine it passes through (a role may size its KV pool differently).
    roles = (config.prefill, config.decode) if config.disaggregated else (config.decode,)
    limit = min(context_limit(config.engine_config(role), hf_config) for role in roles)
    return ServedProduct(config, tokenizer, limit, vocab_size(hf_config), config.resolved_api_keys(), prefix)

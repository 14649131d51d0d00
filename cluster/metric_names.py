"""The cluster's metric vocabulary: bare names, label values, histogram buckets and help texts.

Names follow vLLM's where the meaning is the same, prefixed `pdserve:` when rendered (PREFIX); a snapshot
holds the bare names (the constants below). prometheus_client renders a counter `x` as `pdserve:x_total`.

Invariants: every name is bare ([a-zA-Z_][a-zA-Z0-9_]*, no prefix, no `_total`); a name is one kind only
(counter, labelled counter, gauge or histogram); each bucket tuple increases strictly, in seconds; token
counts are in tokens, bytes in bytes. Only constants here: no imports, so any process may use them.
"""

PREFIX = "pdserve:"

# Roles of a source (the `role` label of num_replicas).
ROLE_INGRESS = "ingress"
ROLE_PREFILL = "prefill"
ROLE_DECODE = "decode"

# Counters (rendered with a `_total` suffix). Token counts in tokens, bytes in bytes.
PREFIX_CACHE_QUERIES = "prefix_cache_queries"  # prompt tokens looked up in a prefix cache
PREFIX_CACHE_HITS = "prefix_cache_hits"  # of those, tokens found
PROMPT_TOKENS_COMPUTED = "prompt_tokens_computed"  # prompt tokens run through a model
PROMPT_TOKENS_CACHED = "prompt_tokens_cached"  # prompt tokens taken from a cache instead
GENERATION_TOKENS = "generation_tokens"
PREEMPTIONS = "preemptions"
KV_SWAP_OUTS = "kv_swap_outs"
KV_TRANSFER_BYTES = "kv_transfer_bytes"
KV_TRANSFER_FAILURES = "kv_transfer_failures"
PREFILL_FAILURES = "prefill_failures"
RECOMPUTED_PREFILLS = "recomputed_prefills"
REMOTE_PREFILLS = "remote_prefills"
LOCAL_PREFILLS = "local_prefills"
MIGRATIONS = "migrations"  # samples resumed on another decode replica after theirs died mid-stream
OVERLOAD_SPILLS = "overload_spills"  # samples tried on another decode replica after an engine refused them for load
DIRECTORY_BLOCKS_FETCHED = "prefix_directory_blocks_fetched"
DIRECTORY_BLOCKS_PUBLISHED = "prefix_directory_blocks_published"
DIRECTORY_ERRORS = "prefix_directory_errors"
DIRECTORY_LOOKUPS = "prefix_directory_lookups"
DIRECTORY_STALE_BLOCKS = "prefix_directory_stale_blocks"
# Labelled counters: bare name -> its one label besides product.
REQUEST_SUCCESS = "request_success"
REQUESTS_REJECTED = "requests_rejected"
COUNTER_LABELS = {REQUEST_SUCCESS: "finished_reason", REQUESTS_REJECTED: "reason"}
# Label values rendered (as 0) before any is counted, so rate() queries have a series from the start.
FINISHED_REASONS = ("stop", "length", "abort")
REJECT_REASONS = ("queue_full", "bad_request", "unauthorized", "too_long", "rate_limited")
KNOWN_LABEL_VALUES = {REQUEST_SUCCESS: FINISHED_REASONS, REQUESTS_REJECTED: REJECT_REASONS}

# Gauges sources report. kv_blocks_* are inputs to kv_cache_usage_perc, not rendered themselves.
NUM_REQUESTS_RUNNING = "num_requests_running"
NUM_REQUESTS_WAITING = "num_requests_waiting"
KV_BLOCKS_USED = "kv_blocks_used"
KV_BLOCKS_TOTAL = "kv_blocks_total"
KV_EXPORTS_ALIVE = "kv_exports_alive"
INGRESS_INFLIGHT = "ingress_inflight"  # samples the ingress is serving (admitted, not yet ended)
TOKEN_STREAMS_OPEN = "token_streams_open"  # the ingress's open token-stream queues
# Gauges only the hub computes.
KV_CACHE_USAGE_PERC = "kv_cache_usage_perc"
NUM_REPLICAS = "num_replicas"

# Histograms, in seconds.
TIME_TO_FIRST_TOKEN = "time_to_first_token_seconds"
INTER_TOKEN_LATENCY = "inter_token_latency_seconds"
E2E_REQUEST_LATENCY = "e2e_request_latency_seconds"
KV_TRANSFER_SECONDS = "kv_transfer_seconds"

# Bucket upper bounds: vLLM's for TTFT, inter-token and e2e latency (so dashboards carry over);
# ours for a KV transfer (sub-millisecond on one host up to seconds across nodes).
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
               20.0, 40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
               240.0, 480.0, 960.0, 1920.0, 7680.0)
KV_TRANSFER_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BUCKETS = {TIME_TO_FIRST_TOKEN: TTFT_BUCKETS, INTER_TOKEN_LATENCY: ITL_BUCKETS,
           E2E_REQUEST_LATENCY: E2E_BUCKETS, KV_TRANSFER_SECONDS: KV_TRANSFER_BUCKETS}

# Families rendered for every product even before anything is counted (the list and ours).
REQUIRED_COUNTERS = (PREFIX_CACHE_QUERIES, PREFIX_CACHE_HITS, PROMPT_TOKENS_COMPUTED, PROMPT_TOKENS_CACHED,
                     GENERATION_TOKENS, PREEMPTIONS, KV_TRANSFER_BYTES, KV_TRANSFER_FAILURES)
REQUIRED_GAUGES = (NUM_REQUESTS_RUNNING, NUM_REQUESTS_WAITING)
REQUIRED_HISTOGRAMS = (TIME_TO_FIRST_TOKEN, INTER_TOKEN_LATENCY, E2E_REQUEST_LATENCY, KV_TRANSFER_SECONDS)

HELP = {
    PREFIX_CACHE_QUERIES: "Prefix cache queries, in prompt tokens looked up.",
    PREFIX_CACHE_HITS: "Prefix cache hits, in prompt tokens found cached.",
    PROMPT_TOKENS_COMPUTED: "Prompt tokens run through a model (prefill work done).",
    PROMPT_TOKENS_CACHED: "Prompt tokens taken from a prefix cache (local pool or cluster directory).",
    GENERATION_TOKENS: "Generated tokens.",
    PREEMPTIONS: "Requests preempted (KV blocks ran out; recomputed or swapped back in later).",
    KV_SWAP_OUTS: "Preemptions that copied the request's KV to host memory (written back later, not recomputed).",
    KV_TRANSFER_BYTES: "Bytes of KV blocks moved from prefill to decode workers.",
    KV_TRANSFER_FAILURES: "KV transfers that failed (the prompt was recomputed on the decode worker).",
    PREFILL_FAILURES: "Remote prefill calls that failed or timed out (recomputed on the decode worker).",
    RECOMPUTED_PREFILLS: "Prompts a decode worker computed itself after a failed prefill or transfer.",
    REMOTE_PREFILLS: "Prompts prefilled on a prefill worker whose KV was imported by a decode worker.",
    LOCAL_PREFILLS: "Prompts a decode worker chose to compute itself: a short uncached part, cheaper than a transfer.",
    MIGRATIONS: "Samples resumed on another decode replica after theirs died (the stream went on).",
    OVERLOAD_SPILLS: "Samples tried on another decode replica after one's engine refused them for load.",
    DIRECTORY_BLOCKS_FETCHED: "KV blocks fetched from the cluster prefix directory.",
    DIRECTORY_BLOCKS_PUBLISHED: "KV blocks published to the cluster prefix directory.",
    DIRECTORY_ERRORS: "Prefix directory calls that failed (served without the directory).",
    DIRECTORY_LOOKUPS: "Fetch calls to the prefix directory (made only when a worker's index lists wanted blocks).",
    DIRECTORY_STALE_BLOCKS: "Blocks a worker's index listed that the directory had evicted (computed instead).",
    REQUEST_SUCCESS: "Requests finished, by finish reason.",
    REQUESTS_REJECTED: "Requests rejected before any work, by reason.",
    NUM_REQUESTS_RUNNING: "Requests in engine batches now (prefill and decode workers).",
    NUM_REQUESTS_WAITING: "Requests queued for an engine batch now.",
    KV_EXPORTS_ALIVE: "KV exports held under a lease by prefill workers now.",
    INGRESS_INFLIGHT: "Samples the HTTP ingress is serving now (counted against max_queue_len).",
    TOKEN_STREAMS_OPEN: "Token-stream queues open on the HTTP ingress now (one per sample being streamed).",
    KV_CACHE_USAGE_PERC: "KV-cache usage over all workers: used blocks / total blocks (1 means 100 percent).",
    NUM_REPLICAS: "Replicas reporting metrics now, by role.",
    TIME_TO_FIRST_TOKEN: "Time to first token in seconds.",
    INTER_TOKEN_LATENCY: "Time between consecutive output tokens in seconds.",
    E2E_REQUEST_LATENCY: "End-to-end request latency in seconds.",
    KV_TRANSFER_SECONDS: "Time to fetch one request's KV blocks in seconds.",
}

"""Prefix-cache isolation: namespaces (cache salts) never share cached blocks, nor leak timing.

The block hash chain includes the cache salt, so the same tokens under another salt
are other blocks. Shown three ways:
- counters, at the engine (deterministic): after a victim's prompt, an attacker
  sending the same tokens (or any prefix of them) under another salt gets no cached
  token and computes every prompt token, exactly like a cold prompt;
- timing, at the engine: the attacker's latency is distributed like a cold
  prompt's, while the victim's own repeat is clearly faster (so the measurement can
  see a hit). Asserted loosely on medians of per-round ratios, with the three kinds of
  request interleaved in every round so machine load hits them alike (2 busy cores);
- over HTTP: two tenants of one product (request `cache_salt`), and one salt under two
  API keys, get `usage.prompt_tokens_details.cached_tokens == 0` where the owner's own
  repeat gets a hit; products of one model and system prompt share one namespace.
"""

from __future__ import annotations

import statistics
import time
import uuid

import openai
import pytest

from engine import LLM, SamplingParams
from tests.engine_helpers import assert_all_free, random_prompts
from tests.test_http_api import REPORT_KEY, REPORT_OTHER_KEY

ONE_TOKEN = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
BLOCK = 16  # EngineConfig's default block_size


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM()


def _run(llm: LLM, prompt: list[int], salt: str | None) -> tuple[int, int]:
    """(cached tokens, prompt tokens computed) of one request."""
    before = llm.stats().prompt_tokens_computed
    out = llm.generate([{"prompt_token_ids": prompt, "cache_salt": salt}], ONE_TOKEN)[0]
    return out.num_cached_tokens, llm.stats().prompt_tokens_computed - before


@pytest.mark.parametrize("seed, victim_salt, attacker_salt", [
    (1, "support-chat", "report-gen"),  # two products
    (2, "support-chat/tenant-a", "support-chat/tenant-b"),  # two tenants of one product (the ingress's salts)
    (3, "support-chat", "support-chat/tenant-a"),  # a tenant and its product's shared namespace
    (4, "support-chat", None),  # salted vs unsalted
])
def test_other_salt_gets_no_cached_block(llm: LLM, seed: int, victim_salt: str, attacker_salt: str | None) -> None:
    victim, cold = random_prompts([300, 300], llm.engine.vocab_size, seed=seed)  # fresh prompts per case
    assert _run(llm, victim, victim_salt) == (0, 300)
    for k in (1, 5, 18):  # probing a prefix of k blocks plus a guess does not hit (a fresh salt per probe:
        probe_salt = f"{attacker_salt}/probe-{k}"  # the attacker's own probes would hit each other)
        assert _run(llm, victim[:k * BLOCK] + [3], probe_salt) == (0, k * BLOCK + 1)
    assert _run(llm, victim, attacker_salt) == (0, 300)  # the whole prompt, as for a cold one ...
    assert _run(llm, cold, attacker_salt) == (0, 300)  # ... like this one
    full = 300 // BLOCK * BLOCK
    assert _run(llm, victim, victim_salt) == (full, 300 - full)  # the owner does hit: the salts are the cause
    assert_all_free(llm)


def _timed(llm: LLM, prompt: list[int], salt: str) -> float:
    start = time.perf_counter()
    llm.generate([{"prompt_token_ids": prompt, "cache_salt": salt}], ONE_TOKEN)
    return time.perf_counter() - start


def test_other_salt_gets_no_timing_signal(llm: LLM) -> None:
    """Cross-salt latency is within noise of cold latency; same-salt latency is far below both.

    Per round: prime a fresh victim prompt, then time (in a rotating order) a fresh cold prompt,
    the victim prompt under the attacker's salt and under the victim's. Ratios to the round's
    cold time cancel slow drifts in machine load; medians over rounds drop outliers. Expected
    ratios are ~1 (cross) and ~0.2 (same, 2048 tokens of which all but the last block cached);
    the bounds (> 0.6 and < 0.5) leave each side a wide margin, so the test fails only if a hit
    happens (cross drops towards 0.2) or the measurement cannot see one (same rises to ~1).
    """
    rounds, length = 9, 2048
    prompts = random_prompts([length] * (2 * rounds), llm.engine.vocab_size, seed=77)
    _timed(llm, prompts[-1], "warm-up")  # first-call costs (allocations, lazy init) out of the measurement
    cross, same = [], []
    for r in range(rounds):
        victim, cold = prompts[2 * r], prompts[2 * r + 1]
        llm.generate([{"prompt_token_ids": victim, "cache_salt": "victim"}], ONE_TOKEN)
        jobs = [("cold", cold, "victim"), ("cross", victim, "attacker"), ("same", victim, "victim")]
        jobs = jobs[r % 3:] + jobs[:r % 3]
        times = {kind: _timed(llm, prompt, salt) for kind, prompt, salt in jobs}
        cross.append(times["cross"] / times["cold"])
        same.append(times["same"] / times["cold"])
    assert statistics.median(same) < 0.5, f"same-salt hits not measurably faster: {same}"
    assert statistics.median(cross) > 0.6, f"cross-salt requests faster than cold ones: {cross}"
    assert_all_free(llm)


# ---- over HTTP ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def clients(pdserve_url: str) -> dict[str, openai.OpenAI]:
    return {name: openai.OpenAI(base_url=f"{pdserve_url}/v1", api_key=key, max_retries=0, timeout=120)
            for name, key in (("support-chat", "unused"), ("report-gen", REPORT_KEY))}


def _cached(client: openai.OpenAI, model: str, prompt: str, tenant: str | None = None) -> int:
    extra = {"ignore_eos": True} if tenant is None else {"ignore_eos": True, "cache_salt": tenant}
    resp = client.completions.create(model=model, prompt=prompt, max_tokens=1, temperature=0, extra_body=extra)
    return resp.usage.prompt_tokens_details.cached_tokens


def _unique_prompt() -> str:
    """~100 tokens no earlier request sent (the session's app lives across test files)."""
    return f"Incident {uuid.uuid4().hex}: " + " ".join(f"line {i} of the confidential report" for i in range(16))


def test_products_with_one_model_and_system_prompt_share_cached_blocks_over_http(
        clients: dict[str, openai.OpenAI]) -> None:
    """support-chat and report-gen serve one model with one system prompt and set no cache_salt: one
    namespace, so what one computed the other reuses (the shared system prompt is computed once).

    A prefill worker publishes a prefix to the cluster directory once it is reused (seen twice): report-gen
    sees the prompt twice, the test waits for the directory to hold it, then support-chat's workers, which
    never saw it, fetch it instead of computing it."""
    import ray

    from cluster.prefix_directory import DIRECTORY_NAME, NAMESPACE

    directory = ray.get_actor(DIRECTORY_NAME, namespace=NAMESPACE)
    before = ray.get(directory.stats.remote(), timeout=60).blocks_published
    prompt = _unique_prompt()
    assert _cached(clients["report-gen"], "report-gen", prompt) == 0
    assert _cached(clients["report-gen"], "report-gen", prompt) > 0  # a reused prefix now: published
    deadline = time.monotonic() + 60
    while ray.get(directory.stats.remote(), timeout=60).blocks_published == before:
        assert time.monotonic() < deadline, "report-gen's reused prefix never reached the directory"
        time.sleep(0.1)
    assert _cached(clients["support-chat"], "support-chat", prompt) > 0


def test_a_tenant_salt_is_tied_to_the_api_key(pdserve_url: str, clients: dict[str, openai.OpenAI]) -> None:
    """Two API keys sending the same cache_salt are two namespaces: a tenant cannot step into another's
    namespace by naming its salt."""
    other = openai.OpenAI(base_url=f"{pdserve_url}/v1", api_key=REPORT_OTHER_KEY, max_retries=0, timeout=120)
    prompt = _unique_prompt()
    assert _cached(clients["report-gen"], "report-gen", prompt, tenant="team") == 0
    assert _cached(other, "report-gen", prompt, tenant="team") == 0
    assert _cached(clients["report-gen"], "report-gen", prompt, tenant="team") > 0


def test_tenants_do_not_share_cached_blocks_over_http(clients: dict[str, openai.OpenAI]) -> None:
    chat, prompt = clients["support-chat"], _unique_prompt()
    assert _cached(chat, "support-chat", prompt, tenant="tenant-a") == 0
    assert _cached(chat, "support-chat", prompt, tenant="tenant-b") == 0
    assert _cached(chat, "support-chat", prompt) == 0  # the product's shared namespace is another one again
    assert _cached(chat, "support-chat", prompt, tenant="tenant-a") > 0

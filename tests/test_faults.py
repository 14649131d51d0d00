"""Faults on a running cluster lose no request silently and leak no KV block.

A second Serve application ("faults", under /faults on the session's HTTP
proxy) gets its own products so that killing its replicas disturbs no other
test: "faults" (one prefill replica, two decode replicas, a small token
budget so a long prefill spans many steps) and "faults-corrupt" (its
prefill side corrupts every KV export it serves: the transfer-fault drill).
Replicas are killed the way an operator (or a crashed node) would: the Serve
replica actor, found by the id it reports its metrics under.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import openai
import pytest
import ray
from ray import serve

from cluster.app import build_app
from cluster.invariants import wait_cluster_idle
from cluster.metric_names import NUM_REQUESTS_RUNNING
from cluster.metrics_hub import get_hub
from cluster.prefix_directory import NAMESPACE, PrefixDirectory
from cluster.products import Autoscaling, ProductConfig
from engine.config import SamplingParams
from tests.cluster_helpers import assert_idle, generate, kill_all, start_decode, start_prefill, tiny_products
from tests.engine_helpers import random_prompts
from tests.test_http_api import _metrics

APP = "faults"
PRODUCT = "faults"
CORRUPT = "faults-corrupt"
TWO_PREFILLS = "faults-two-prefills"
LONG_LEASE_S = 120  # far past the idle check below: an export released late is not reaped in time
TIMEOUT_S = 120
SERVE_MODE = "faults-serve-mode"  # an app (and product) like "faults" whose tokens come back through Serve's calls


def _fixed(replicas: int) -> Autoscaling:
    return Autoscaling(min_replicas=replicas, max_replicas=replicas, initial_replicas=replicas)


def _two_decoders(name: str) -> ProductConfig:
    """One prefill replica, two decode replicas, a small token budget (a long prefill spans many steps)."""
    base = tiny_products()["support-chat"]
    return base.model_copy(update={
        "name": name, "cache_salt": name, "max_output_tokens": 2048,
        "engine": {**base.engine, "max_num_batched_tokens": 16},
        "prefill": base.prefill.model_copy(update={"autoscaling": _fixed(1)}),
        "decode": base.decode.model_copy(update={"autoscaling": _fixed(2)}),
    })


@pytest.fixture(scope="module")
def faults_url(pdserve_url: str):
    base = tiny_products()["support-chat"]
    faults = _two_decoders(PRODUCT)
    corrupt = base.model_copy(update={
        "name": CORRUPT, "cache_salt": CORRUPT,
        "transfer": {**base.transfer, "fault": "corrupt", "lease_s": LONG_LEASE_S},
        "prefill": base.prefill.model_copy(update={"autoscaling": _fixed(1)}),
        "decode": base.decode.model_copy(update={"autoscaling": _fixed(1)}),
    })
    two_prefills = base.model_copy(update={
        "name": TWO_PREFILLS, "cache_salt": TWO_PREFILLS, "system_prompt": "",  # no shared prefix: no affinity
        "transfer": {**base.transfer, "lease_s": LONG_LEASE_S},
        "prefill": base.prefill.model_copy(update={"autoscaling": _fixed(2)}),
        "decode": base.decode.model_copy(update={"autoscaling": _fixed(1)}),
    })
    products = {PRODUCT: faults, CORRUPT: corrupt, TWO_PREFILLS: two_prefills}
    serve.run(build_app(products, token_stream_host="127.0.0.1"), name=APP, route_prefix=f"/{APP}")
    yield f"{pdserve_url}/{APP}"
    serve.delete(APP)


@pytest.fixture(scope="module")
def serve_mode_url(pdserve_url: str):
    serve.run(build_app({SERVE_MODE: _two_decoders(SERVE_MODE)}, token_stream="serve"), name=SERVE_MODE,
              route_prefix=f"/{SERVE_MODE}")
    yield f"{pdserve_url}/{SERVE_MODE}"
    serve.delete(SERVE_MODE)


def _client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=TIMEOUT_S)


@pytest.fixture(scope="module")
def client(faults_url: str) -> openai.OpenAI:
    return _client(faults_url)


def _chat(client: openai.OpenAI, content: str, max_tokens: int, model: str = PRODUCT, stream: bool = False):
    return client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": content}], max_tokens=max_tokens, temperature=0,
        stream=stream, extra_body={"ignore_eos": True},
        **({"stream_options": {"include_usage": True}} if stream else {}))


def _sources(role: str, product: str = PRODUCT):
    hub = get_hub()
    return [s for s in ray.get(hub.sources.remote(), timeout=TIMEOUT_S)
            if s.role == role and s.product == product and s.live]


def _wait_for_busy_replicas(role: str, count: int, timeout_s: float = 30, product: str = PRODUCT) -> dict[str, int]:
    """Running requests by replica id once `count` live replicas of `role` report some (every ~1 s)."""
    deadline = time.monotonic() + timeout_s
    busy: dict[str, int] = {}
    while time.monotonic() < deadline:
        busy = {s.source_id: s.gauges[NUM_REQUESTS_RUNNING] for s in _sources(role, product)
                if s.gauges.get(NUM_REQUESTS_RUNNING, 0) > 0}
        if len(busy) >= count:
            return busy
        time.sleep(0.2)
    raise AssertionError(f"fewer than {count} {role} replicas reported running requests: {busy}")


def _wait_until_prefilling(timeout_s: float = 30) -> str:
    """The prefill replica's id once it runs a request. Asked directly, not through the 1 s metrics
    push: at 16 tokens per step the prefill lasts well under a second more."""
    handle = serve.get_deployment_handle(f"{PRODUCT}-prefill", app_name=APP)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        stats = handle.stats.remote().result(timeout_s=TIMEOUT_S)
        if stats.engine.num_requests_running:
            return stats.worker_id
        time.sleep(0.01)
    raise AssertionError("the request never reached the prefill replica")


def _kill_replica(replica_id: str) -> None:
    # A Serve replica's actor is named by its full replica id in the "serve" namespace.
    ray.kill(ray.get_actor(replica_id, namespace="serve"), no_restart=True)


def _wait_replaced(deployment: str, dead: str, replicas: int, app: str = APP) -> None:
    """Serve runs `replicas` healthy replicas of the deployment again, none of them the dead one."""
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        status = serve.status().applications[app].deployments[deployment]
        running = status.replica_states.get("RUNNING", 0)
        alive = {name for name in _named_replicas(deployment, app)}
        if status.status == "HEALTHY" and running == replicas and dead not in alive and len(alive) == replicas:
            return
        time.sleep(0.5)
    raise AssertionError(f"{deployment} was not replaced: {serve.status().applications[app].deployments}")


def _named_replicas(deployment: str, app: str = APP) -> list[str]:
    prefix = f"SERVE_REPLICA::{app}#{deployment}#"
    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["namespace"] == "serve" and a["name"].startswith(prefix)]


def _assert_idle(products: tuple[str, ...] = (PRODUCT, CORRUPT)) -> None:
    problems = wait_cluster_idle(get_hub(), timeout_s=30, products=products)
    assert not problems, problems


@dataclass
class _Run:
    """A streamed chat answer as the client saw it: text, token strings (logprobs), usage, chunk times."""

    text: str = ""
    tokens: list[str] = field(default_factory=list)
    completion_tokens: int = 0
    times: list[float] = field(default_factory=list)  # time.monotonic() of each chunk


def _streamed(client: openai.OpenAI, content: str, max_tokens: int, seed: int | None,
              started: threading.Event | None = None, model: str = PRODUCT) -> _Run:
    """Greedy without a seed, else temperature 1 with it; raises on a stream error event."""
    run = _Run()
    for chunk in client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": content}], max_tokens=max_tokens,
            temperature=0 if seed is None else 1.0, seed=seed, logprobs=True, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True}):
        run.times.append(time.monotonic())
        if started is not None:
            started.set()
        if chunk.usage is not None:
            run.completion_tokens = chunk.usage.completion_tokens
        for choice in chunk.choices:
            run.text += choice.delta.content or ""
            run.tokens += [t.token for t in (choice.logprobs.content or [])] if choice.logprobs else []
    return run


def _longest_gap_after(times: list[float], moment: float) -> float:
    """The longest wait between chunks that ended after moment (seconds): the pause a migration made."""
    return max((b - a for a, b in zip(times, times[1:], strict=False) if b > moment), default=0.0)


@pytest.mark.parametrize("mode", ["direct", "serve"])
def test_decode_replica_death_mid_stream_resumes_every_stream_token_for_token(mode: str, request) -> None:
    """Greedy and seeded streams (and a whole answer) on two decode replicas; the busier replica is killed
    mid-stream. Every answer completes and equals an uninterrupted run of the same request, token for token.
    mode: how tokens reach the ingress (direct token streams, or Serve's streaming calls)."""
    app, url = (APP, request.getfixturevalue("faults_url")) if mode == "direct" else (
        SERVE_MODE, request.getfixturevalue("serve_mode_url"))
    product, client = app, _client(url)  # each app's product is named like it
    length, seeds = 1000, [None, None, 11, 12]
    contents = [f"stream {i}" for i in range(len(seeds))]
    with ThreadPoolExecutor(max_workers=len(seeds) + 1) as pool:  # the uninterrupted runs
        expected = list(pool.map(lambda cs: _streamed(client, cs[0], length, cs[1], model=product),
                                 zip(contents, seeds, strict=True)))
        expected_plain = _chat(client, "not streamed", length, model=product).choices[0].message.content
    label = (("product", product),)
    before = _metrics(url).get(("pdserve:migrations_total", label), 0)
    started = [threading.Event() for _ in seeds]
    with ThreadPoolExecutor(max_workers=len(seeds) + 1) as pool:
        streams = [pool.submit(_streamed, client, content, length, seed, event, product)
                   for content, seed, event in zip(contents, seeds, started, strict=True)]
        for event in started:
            assert event.wait(TIMEOUT_S), "a stream never started"
        plain = pool.submit(_chat, client, "not streamed", length, product)
        # the router spreads the five over both replicas (by queue length: their KV is equally free)
        running = _wait_for_busy_replicas("decode", count=2, product=product)
        victim = max(running, key=running.__getitem__)
        killed_at = time.monotonic()
        _kill_replica(victim)
        runs = [f.result(timeout=TIMEOUT_S) for f in streams]
        plain_text = plain.result(timeout=TIMEOUT_S).choices[0].message.content
    for run, want in zip(runs, expected, strict=True):
        assert run.completion_tokens == want.completion_tokens == length
        assert run.tokens == want.tokens and run.text == want.text
    assert plain_text == expected_plain
    stalls = sorted(_longest_gap_after(run.times, killed_at) for run in runs)
    print(f"longest gap between chunks after the kill, per stream (s): {[round(s, 2) for s in stalls]}")
    assert stalls[-1] < 30, "a migration waited on a timeout instead of the replica's death"
    deadline = time.monotonic() + 10
    while _metrics(url).get(("pdserve:migrations_total", label), 0) < before + running[victim]:
        assert time.monotonic() < deadline, f"fewer than {running[victim]} migrations counted"
        time.sleep(0.5)
    _wait_replaced(f"{product}-decode", victim, replicas=2, app=app)
    _assert_idle((product,))


def test_prefill_replica_death_mid_request_costs_only_latency(client: openai.OpenAI, faults_url: str) -> None:
    prompt = "Summarise this log line by line. " + " ".join(f"line {i}: disk quota ok." for i in range(300))
    before = _metrics(faults_url)
    with ThreadPoolExecutor(max_workers=1) as pool:
        future = pool.submit(_chat, client, prompt, 8)
        victim = _wait_until_prefilling()
        _kill_replica(victim)
        faulted = future.result(timeout=TIMEOUT_S)
    _wait_replaced(f"{PRODUCT}-prefill", victim, replicas=1)
    again = _chat(client, prompt, 8)  # a normal run of the same greedy request
    assert faulted.choices[0].message.content == again.choices[0].message.content
    assert faulted.usage.completion_tokens == 8
    label = (("product", PRODUCT),)
    deadline = time.monotonic() + 10
    while _metrics(faults_url).get(("pdserve:recomputed_prefills_total", label), 0) <= before.get(
            ("pdserve:recomputed_prefills_total", label), 0):
        assert time.monotonic() < deadline, "the fallback prefill was not counted"
        time.sleep(0.5)
    _assert_idle()


def test_transfer_faults_are_recomputed_counted_and_leave_no_export(client: openai.OpenAI, faults_url: str) -> None:
    label = (("product", CORRUPT),)
    name = "pdserve:kv_transfer_failures_total"
    before = _metrics(faults_url).get((name, label), 0)
    first = _chat(client, "a corrupted transfer, twice", 6, model=CORRUPT)
    second = _chat(client, "a corrupted transfer, twice", 6, model=CORRUPT)
    assert first.choices[0].message.content == second.choices[0].message.content
    deadline = time.monotonic() + 10
    while _metrics(faults_url).get((name, label), 0) < before + 2:
        assert time.monotonic() < deadline, "transfer failures not counted"
        time.sleep(0.5)
    _assert_idle((CORRUPT,))  # includes kv_exports_alive == 0 on the prefill side


def test_with_two_prefill_replicas_every_export_is_released_at_once(client: openai.OpenAI) -> None:
    """Concurrent requests spread over two prefill replicas; each export's release reaches the replica that
    holds it, so none waits for its lease (LONG_LEASE_S, far past the idle check's 30 s)."""
    contents = [" ".join(f"w{i}x{j}" for j in range(40)) for i in range(8)]  # no two share a block
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda c: _chat(client, c, 4, model=TWO_PREFILLS), contents))
    assert all(a.usage.completion_tokens == 4 for a in answers)
    assert len(_sources("prefill", TWO_PREFILLS)) == 2
    _assert_idle((TWO_PREFILLS,))  # kv_exports_alive == 0 on both prefill replicas


def test_client_disconnect_frees_blocks_on_both_sides(faults_url: str) -> None:
    body = {"model": PRODUCT, "messages": [{"role": "user", "content": "a long answer I will not wait for"}],
            "max_tokens": 2000, "ignore_eos": True, "stream": True}
    label = (("product", PRODUCT),)
    url = urlsplit(faults_url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=TIMEOUT_S)
    try:
        conn.request("POST", f"{url.path}/v1/chat/completions", body=json.dumps(body),
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 200
        for _ in range(5):  # a few SSE lines: the request is decoding
            resp.readline()
        deadline = time.monotonic() + 10
        while _metrics(faults_url).get(("pdserve:kv_cache_usage_perc", label), 0) == 0:
            assert time.monotonic() < deadline, "the request never showed in /metrics"
            time.sleep(0.3)
    finally:
        conn.close()  # the client goes away mid-stream
    deadline = time.monotonic() + 15
    while True:
        now = _metrics(faults_url)
        if now[("pdserve:kv_cache_usage_perc", label)] == 0 and now[("pdserve:num_requests_running", label)] == 0:
            break
        assert time.monotonic() < deadline, "blocks still held after the client left"
        time.sleep(0.3)
    _assert_idle()


def test_directory_death_degrades_then_refills_and_repins(ray_local) -> None:
    """A directory of its own (the session app's stays untouched); Ray restarts it empty after the kill."""
    name = "faults-directory"
    directory = ray.remote(num_cpus=0, max_restarts=-1)(PrefixDirectory).options(
        name=name, namespace=NAMESPACE, lifetime="detached").remote(64 << 20)
    prefill = start_prefill(directory=name)
    decode = start_decode(prefill)
    fresh_prefill = fresh_decode = None
    greedy = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    system = random_prompts([220], 8192, seed=40)[0]
    system_blocks = 220 // 16
    try:
        assert ray.get(prefill.warm_prefix.remote(system), timeout=TIMEOUT_S) == system_blocks
        reference = generate(decode, system + [11, 12, 13], greedy)["token_ids"]
        ray.kill(directory, no_restart=False)  # dies now; Ray restarts it with nothing in it
        # Serving continues (prefix reuse falls back to the worker's own cache) with the same output.
        assert generate(decode, system + [11, 12, 13], greedy)["token_ids"] == reference
        deadline = time.monotonic() + TIMEOUT_S
        while True:  # the next request through the system prompt refills and re-pins it
            generate(decode, system + [int(time.monotonic() * 1000) % 8000 + 3], greedy)
            try:
                stats = ray.get(directory.stats.remote(), timeout=TIMEOUT_S)
            except ray.exceptions.ActorUnavailableError as restarting:  # a slow box may still be restarting it
                stats = restarting
            else:
                if stats.pinned_entries == system_blocks:
                    break
            assert time.monotonic() < deadline, f"directory not refilled: {stats}"
            time.sleep(0.5)
        # A worker that never saw the system prompt now fetches it instead of computing it again.
        fresh_prefill = start_prefill(directory=name)
        fresh_decode = start_decode(fresh_prefill)
        prompt = system + [21, 22, 23, 24]
        assert generate(fresh_decode, prompt, greedy)["token_ids"] == generate(decode, prompt, greedy)["token_ids"]
        fresh = ray.get(fresh_prefill.stats.remote(), timeout=TIMEOUT_S)
        assert fresh.directory_blocks_fetched == system_blocks
        assert fresh.engine.prompt_tokens_computed == len(prompt) - system_blocks * 16
        assert_idle([prefill, fresh_prefill], [decode, fresh_decode])
    finally:
        kill_all(prefill, decode, *(a for a in (fresh_prefill, fresh_decode) if a is not None), directory)

"""The OpenAI-compatible endpoint, through the official `openai` client and raw HTTP.

Greedy outputs equal the offline engine's for the same prompt; usage counts
are right (cached_tokens > 0 once a product's system prompt is pinned);
every refusal has OpenAI's error shape and status and changes no state.
"""

from __future__ import annotations

import ipaddress
import json
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
from cryptography import x509
from prometheus_client.parser import text_string_to_metric_families
from transformers import AutoTokenizer

from cluster.app import build_app
from engine import LLM, SamplingParams
from engine.tiny_model import path as model_path
from kvtransfer.config import is_loopback
from tests.cluster_helpers import tiny_products
from tests.tls_helpers import write_self_signed

REPORT_KEY = "sk-report-test"
REPORT_OTHER_KEY = "sk-report-other"  # a second tenant of report-gen


@pytest.fixture(scope="module")
def client(pdserve_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{pdserve_url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def report_client(pdserve_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{pdserve_url}/v1", api_key=REPORT_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def offline() -> LLM:
    return LLM(model_path("tiny"))


@pytest.fixture(scope="module")
def products():
    return tiny_products()


def _chat_ids(products, product: str, user: str) -> list[int]:
    tokenizer = AutoTokenizer.from_pretrained(model_path("tiny"))
    messages = [{"role": "system", "content": products[product].system_prompt}, {"role": "user", "content": user}]
    return tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False)


def _post(url: str, body: bytes | dict, headers: dict | None = None) -> tuple[int, dict, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method="POST",
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, json.loads(resp.read()), {k.lower(): v for k, v in resp.headers.items()}
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read()), {k.lower(): v for k, v in err.headers.items()}


def _metrics(url: str) -> dict[tuple[str, tuple], float]:
    text = urllib.request.urlopen(f"{url}/metrics", timeout=60).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def _settled_metrics(url: str, timeout_s: float = 30) -> dict[tuple[str, tuple], float]:
    """Metrics once earlier tests' requests have drained (workers push every second)."""
    deadline = time.monotonic() + timeout_s
    last = _metrics(url)
    while time.monotonic() < deadline:
        time.sleep(2.5)
        now = _metrics(url)
        if all(now.get(k) == v for k, v in last.items() if k[0].endswith("_total")):
            return now
        last = now
    return last


def test_models_lists_both_products(client: openai.OpenAI) -> None:
    assert sorted(m.id for m in client.models.list().data) == ["report-gen", "support-chat"]


def test_chat_greedy_equals_offline_engine_and_usage(client, offline, products) -> None:
    user = "How do I rotate my API key?"
    resp = client.chat.completions.create(model="support-chat", messages=[{"role": "user", "content": user}],
                                          max_tokens=16, temperature=0, extra_body={"ignore_eos": True})
    ids = _chat_ids(products, "support-chat", user)
    expected = offline.generate([ids], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))[0]
    assert resp.choices[0].message.content == expected.outputs[0].text
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage.prompt_tokens == len(ids) and resp.usage.completion_tokens == 16
    assert resp.usage.total_tokens == len(ids) + 16
    # the product's system prompt was computed once at start-up and pinned: full blocks are cached
    assert resp.usage.prompt_tokens_details.cached_tokens >= (len(products["support-chat"].system_prompt) > 0) * 16


def test_chat_streaming_equals_non_streaming(client) -> None:
    messages = [{"role": "user", "content": "Summarise my last invoice."}]
    full = client.chat.completions.create(model="support-chat", messages=messages, max_tokens=12, temperature=0,
                                          extra_body={"ignore_eos": True})
    chunks = list(client.chat.completions.create(model="support-chat", messages=messages, max_tokens=12,
                                                 temperature=0, stream=True, extra_body={"ignore_eos": True},
                                                 stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    usage = chunks[-1].usage
    assert not chunks[-1].choices and usage.completion_tokens == 12
    assert usage.prompt_tokens == full.usage.prompt_tokens and usage.prompt_tokens_details.cached_tokens > 0


@pytest.mark.parametrize("setup", ["serve", "plaintext-across-hosts", "tls-across-hosts"])
def test_tokens_take_the_path_their_security_allows_and_give_the_same_answers(
        pdserve_url: str, products, offline, tmp_path, setup: str) -> None:
    """token_stream "serve" (each output a Serve streaming item); "direct" on the node's address without
    TLS, which must not go out in plaintext and so falls back to serve; and "direct" over TLS there."""
    import ray
    from ray import serve

    node_ip = ray.util.get_node_ip_address()
    assert not is_loopback(node_ip)  # Ray refuses a loopback node address
    args: dict = {"token_stream": "serve"} if setup == "serve" else {"token_stream_host": node_ip}
    if setup == "tls-across-hosts":
        files = write_self_signed(tmp_path, "pdserve-ingress", [x509.IPAddress(ipaddress.ip_address(node_ip))])
        args["token_stream_security"] = {"tls_cert_file": files.cert, "tls_key_file": files.key,
                                         "tls_ca_file": files.ca}
    chat = products["support-chat"].model_copy(update={"disaggregated": False})
    serve.run(build_app({"support-chat": chat}, **args), name="token-path", route_prefix="/token-path")
    try:
        c = openai.OpenAI(base_url=f"{pdserve_url}/token-path/v1", api_key="none", max_retries=0)
        prompt = "Quarterly usage report:"
        expected = offline.generate([prompt], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))[0]
        streamed = "".join(ch.choices[0].text for ch in c.completions.create(
            model="support-chat", prompt=prompt, max_tokens=10, temperature=0, stream=True,
            extra_body={"ignore_eos": True}))
        assert streamed == expected.outputs[0].text
        with urllib.request.urlopen(f"{pdserve_url}/token-path/health", timeout=30) as response:
            health = json.loads(response.read())
        assert health["token_stream"] == ("direct" if setup == "tls-across-hosts" else "serve")
    finally:
        serve.delete("token-path")


def test_bad_token_stream_security_is_refused_when_the_app_is_built(products) -> None:
    with pytest.raises(ValueError, match="token stream"):
        build_app(products, token_stream_security={"tls_cert_file": "only-one.pem"})


def test_an_unknown_token_stream_mode_is_refused(products) -> None:
    with pytest.raises(ValueError, match="token_stream"):
        build_app(products, token_stream="carrier-pigeon")


def test_completions_both_products_stream_and_not(client, report_client, offline) -> None:
    prompt = "Quarterly usage report:"
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    expected = offline.generate([prompt], params)[0].outputs[0].text
    for c, model in ((client, "support-chat"), (report_client, "report-gen")):
        resp = c.completions.create(model=model, prompt=prompt, max_tokens=10, temperature=0,
                                    extra_body={"ignore_eos": True})
        assert resp.choices[0].text == expected and resp.usage.completion_tokens == 10
        streamed = "".join(ch.choices[0].text for ch in c.completions.create(
            model=model, prompt=prompt, max_tokens=10, temperature=0, stream=True, extra_body={"ignore_eos": True}))
        assert streamed == expected


def test_a_streamed_answer_stops_before_its_stop_string_as_the_whole_answer_does(client, offline) -> None:
    """The stop string is a stretch of the greedy answer's middle: neither it nor its first characters reach
    the stream, which equals the JSON answer."""
    prompt = "Quarterly usage report:"
    full = offline.generate([prompt], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))[0].outputs[0].text
    stop = full[len(full) // 2:len(full) // 2 + 3]
    assert len(stop) == 3 and full.index(stop) > 0
    kwargs = {"model": "support-chat", "prompt": prompt, "max_tokens": 24, "temperature": 0, "stop": [stop],
              "extra_body": {"ignore_eos": True}}
    whole = client.completions.create(**kwargs).choices[0]
    assert whole.text == full[:full.index(stop)] and whole.finish_reason == "stop"
    chunks = list(client.completions.create(stream=True, **kwargs))
    assert "".join(ch.choices[0].text for ch in chunks) == whole.text
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_second_request_of_a_product_hits_the_cache(report_client) -> None:
    messages = [{"role": "user", "content": "Write the incident report for last night."}]
    first = report_client.chat.completions.create(model="report-gen", messages=messages, max_tokens=4)
    second = report_client.chat.completions.create(model="report-gen", messages=messages, max_tokens=4)
    assert second.usage.prompt_tokens_details.cached_tokens > 0
    assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens_details.cached_tokens


def test_n_seed_and_stop(client) -> None:
    messages = [{"role": "user", "content": "Give me three tips."}]
    a = client.chat.completions.create(model="support-chat", messages=messages, max_tokens=8, n=2, seed=7,
                                       temperature=1.0, extra_body={"ignore_eos": True})
    b = client.chat.completions.create(model="support-chat", messages=messages, max_tokens=8, n=2, seed=7,
                                       temperature=1.0, extra_body={"ignore_eos": True})
    assert [c.index for c in a.choices] == [0, 1]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert a.usage.completion_tokens == 16
    free = client.chat.completions.create(model="support-chat", messages=messages, max_tokens=16, temperature=0,
                                          extra_body={"ignore_eos": True}).choices[0].message.content
    stop = free[len(free) // 2: len(free) // 2 + 2]
    stopped = client.chat.completions.create(model="support-chat", messages=messages, max_tokens=16,
                                             temperature=0, stop=[stop], extra_body={"ignore_eos": True})
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].message.content == free[: free.find(stop)]


def _assert_error(status: int, body: dict, expected: int, text: str) -> None:
    assert status == expected, body
    assert set(body) == {"error"} and {"message", "type", "code", "param"} <= set(body["error"])
    assert text in body["error"]["message"]


def test_errors_have_openai_shape_and_change_no_state(pdserve_url: str) -> None:
    url = f"{pdserve_url}/v1/chat/completions"
    ok = {"model": "support-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    before = _settled_metrics(pdserve_url)
    _assert_error(*_post(url, b"{not json")[:2], 400, "malformed JSON")
    _assert_error(*_post(url, {**ok, "max_tokens": "many"})[:2], 422, "max_tokens")
    _assert_error(*_post(url, {**ok, "temperature": -1})[:2], 422, "temperature")
    _assert_error(*_post(url, {**ok, "messages": []})[:2], 422, "messages")
    _assert_error(*_post(url, {k: v for k, v in ok.items() if k != "model"})[:2], 422, "model")
    _assert_error(*_post(url, {**ok, "model": "no-such-model"})[:2], 404, "does not exist")
    long_text = "word " * 5000
    status, body, _ = _post(url, {**ok, "messages": [{"role": "user", "content": long_text}]})
    _assert_error(status, body, 400, "maximum context length")
    assert "in the prompt" in body["error"]["message"] and body["error"]["code"] == "context_length_exceeded"
    _assert_error(*_post(url, {**ok, "max_tokens": 10**6})[:2], 400, "max_tokens")
    report = {**ok, "model": "report-gen"}
    _assert_error(*_post(url, report)[:2], 401, "API key")
    _assert_error(*_post(url, report, {"Authorization": "Bearer wrong"})[:2], 401, "API key")
    time.sleep(2.5)  # one worker push period and then some: a leaked request would show by now
    after = _metrics(pdserve_url)
    for product in ("support-chat", "report-gen"):
        key = ("pdserve:prompt_tokens_computed_total", (("product", product),))
        assert after[key] == before[key], "a refused request reached an engine"
    rejected = ("pdserve:requests_rejected_total", (("product", "report-gen"), ("reason", "unauthorized")))
    assert after[rejected] - before.get(rejected, 0) == 2


def test_queue_full_gets_429_with_retry_after(pdserve_url: str) -> None:
    body = {"model": "support-chat", "messages": [{"role": "user", "content": "long answer please"}],
            "max_tokens": 200, "ignore_eos": True}

    with ThreadPoolExecutor(max_workers=40) as pool:  # 40 clients at once against a queue of 24
        results = list(pool.map(lambda _: _post(f"{pdserve_url}/v1/chat/completions", body), range(40)))
    statuses = [r[0] for r in results]
    assert 429 in statuses and 200 in statuses
    for status, payload, headers in results:
        if status == 429:
            assert headers.get("retry-after") == "1" and payload["error"]["code"] == "queue_full"
        else:
            assert status == 200 and payload["usage"]["completion_tokens"] == 200


def test_metrics_parse_and_move(pdserve_url: str, client) -> None:
    before = _metrics(pdserve_url)
    client.chat.completions.create(model="support-chat", messages=[{"role": "user", "content": "ping"}],
                                   max_tokens=5, temperature=0, extra_body={"ignore_eos": True})
    label = (("product", "support-chat"),)
    moving = ("pdserve:prompt_tokens_computed_total", "pdserve:generation_tokens_total",
              "pdserve:time_to_first_token_seconds_count", "pdserve:e2e_request_latency_seconds_count")
    deadline = time.monotonic() + 10  # workers push their counters every second
    while True:
        after = _metrics(pdserve_url)
        if all(after[(n, label)] > before.get((n, label), 0) for n in moving) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    for name in moving:
        assert after[(name, label)] > before.get((name, label), 0), name
    assert after[("pdserve:inter_token_latency_seconds_count", label)] - before.get(
        ("pdserve:inter_token_latency_seconds_count", label), 0) == 4
    for name in ("pdserve:kv_cache_usage_perc", "pdserve:num_requests_running", "pdserve:num_requests_waiting",
                 "pdserve:prefix_cache_queries_total", "pdserve:prefix_cache_hits_total",
                 "pdserve:prompt_tokens_cached_total", "pdserve:kv_transfer_bytes_total",
                 "pdserve:kv_transfer_seconds_count", "pdserve:kv_transfer_failures_total",
                 "pdserve:preemptions_total"):
        assert (name, label) in after, name

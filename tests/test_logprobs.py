"""`logprobs` over the API: the values are the model's (checked against transformers), in OpenAI's shapes
for chat and completions, streamed and not, for every sample of `n`; bad values are refused."""

from __future__ import annotations

import math

import openai
import pytest
from transformers import AutoTokenizer

from engine.models import resolve as model_path
from tests.engine_helpers import hf_greedy, random_prompts
from tests.test_http_api import _post

MODEL = "support-chat"
VOCAB = 8192  # the built-in tiny model's
TOP = 3


@pytest.fixture(scope="module")
def client(pdserve_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{pdserve_url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(model_path("tiny"))


def test_completion_logprobs_are_the_models(client, tokenizer) -> None:
    """Greedy over token ids: each token's logprob equals transformers' log-softmax of its logits, the
    top alternatives are sorted and led by the chosen token, and the strings are the tokens decoded."""
    prompt = random_prompts([40], VOCAB, seed=21)[0]
    expected_ids, expected_lps = hf_greedy(model_path("tiny"), prompt, 8)
    resp = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0, logprobs=TOP,
                                     extra_body={"ignore_eos": True})
    lp = resp.choices[0].logprobs
    assert lp.tokens == [tokenizer.decode([t]) for t in expected_ids]
    assert all(math.isclose(a, b, abs_tol=1e-3) for a, b in zip(lp.token_logprobs, expected_lps, strict=True))
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert len(top) <= TOP and list(top.values()) == sorted(top.values(), reverse=True)
        assert math.isclose(max(top.values()), value, abs_tol=1e-6) and top.get(token) == value  # greedy
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]


def test_chat_logprobs_streamed_equal_unstreamed(client) -> None:
    kwargs = {"model": MODEL, "messages": [{"role": "user", "content": "List three regions."}], "max_tokens": 10,
              "temperature": 0, "logprobs": True, "top_logprobs": TOP, "extra_body": {"ignore_eos": True}}
    full = client.chat.completions.create(**kwargs)
    content = full.choices[0].logprobs.content
    assert len(content) == full.usage.completion_tokens == 10
    for entry in content:
        assert len(entry.top_logprobs) == TOP and entry.bytes == list(entry.token.encode())
        assert entry.top_logprobs[0].logprob == entry.logprob <= 0  # greedy: the chosen token leads
        assert [t.logprob for t in entry.top_logprobs] == sorted((t.logprob for t in entry.top_logprobs),
                                                                reverse=True)
    chunks = list(client.chat.completions.create(**kwargs, stream=True))
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [e.token for e in streamed] == [e.token for e in content]
    # the repeat reads its prompt from the prefix cache: float32 rounding differs, not the values
    assert all(math.isclose(a.logprob, b.logprob, abs_tol=1e-4) for a, b in zip(streamed, content, strict=True))


def test_logprobs_without_alternatives_and_for_every_sample(client) -> None:
    resp = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                          n=2, seed=5, logprobs=True, extra_body={"ignore_eos": True})
    assert len(resp.choices) == 2
    for choice in resp.choices:
        assert len(choice.logprobs.content) == 4
        assert all(e.top_logprobs == [] and e.logprob <= 0 for e in choice.logprobs.content)
    plain = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert plain.choices[0].logprobs is None  # only when asked


@pytest.mark.parametrize("path, extra", [
    ("/v1/chat/completions", {"top_logprobs": 2}),  # without logprobs: true
    ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 21}),
    ("/v1/chat/completions", {"logprobs": "yes"}),
    ("/v1/completions", {"logprobs": 21}),
    ("/v1/completions", {"logprobs": True}),  # an integer field: true is not 1
    ("/v1/completions", {"logprobs": -1}),
])
def test_bad_logprobs_values_are_refused(pdserve_url: str, path: str, extra: dict) -> None:
    body = ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]} if "chat" in path
            else {"model": MODEL, "prompt": "hi"})
    status, payload, _ = _post(f"{pdserve_url}{path}", {**body, "max_tokens": 2, **extra})
    assert status == 422 and payload["error"]["param"] in ("logprobs", "top_logprobs", None), payload


def test_formatter_shapes_offsets_and_infinities(tokenizer) -> None:
    """Offsets continue across calls (stream chunks); -inf (a token the model rules out) stays valid JSON."""
    from cluster.logprobs import MIN_LOGPROB, LogprobFormatter

    a, b, c = 100, 200, 300
    formatter = LogprobFormatter(tokenizer, top=2)
    first = formatter.completion([a], [{a: -0.5, b: -1.0, c: float("-inf")}])
    second = formatter.completion([b], [{b: float("-inf"), a: -0.1}])
    assert first["text_offset"] == [0] and second["text_offset"] == [len(tokenizer.decode([a]))]
    assert second["token_logprobs"] == [MIN_LOGPROB]
    assert list(first["top_logprobs"][0].values()) == [-0.5, -1.0]  # the best two, best first
    chat = LogprobFormatter(tokenizer, top=0).chat([c], [{c: float("-inf")}])
    assert chat == {"content": [{"token": tokenizer.decode([c]), "logprob": MIN_LOGPROB,
                                 "bytes": list(tokenizer.decode([c]).encode()), "top_logprobs": []}]}

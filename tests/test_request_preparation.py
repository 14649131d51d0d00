"""Request preparation on its own (no Ray, a stand-in tokenizer): product lookup and keys, tokenizing off the
event loop, the chat template's messages, limits, sampling parameters, seeds and cache namespaces."""

from __future__ import annotations

import asyncio
import dataclasses
import threading

import pytest

from cluster import openai_protocol as oai
from cluster.http_edge import APIError
from cluster.request_preparation import PreparedRequest, RequestPreparer, chat_messages, prepare
from cluster.served_product import ServedProduct, load_product
from tests.cluster_helpers import tiny_products

VOCAB = 100
MAX_MODEL_LEN = 100


class Tokenizer:
    """One token per character (its code modulo VOCAB); a chat template of "role:content" turns. Records the
    thread each call ran on and the messages templated."""

    def __init__(self, refuse: bool = False) -> None:
        self.refuse, self.threads, self.messages = refuse, [], []

    def __len__(self) -> int:
        return VOCAB

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        assert not add_special_tokens  # the prompt is the client's text, nothing added
        self.threads.append(threading.current_thread().name)
        return [ord(c) % VOCAB for c in text]

    def apply_chat_template(self, messages: list[dict], tokenize: bool, add_generation_prompt: bool,
                            return_dict: bool) -> list[int]:
        self.threads.append(threading.current_thread().name)
        if self.refuse:
            raise RuntimeError("Conversation roles must alternate user/assistant")
        self.messages.append(messages)
        return self.encode("".join(f"{m['role']}:{m['content']}|" for m in messages), add_special_tokens=False)


def _product(tokenizer: Tokenizer | None = None, keys: frozenset[str] = frozenset(), **config) -> ServedProduct:
    base = tiny_products()["support-chat"]
    config = base.model_copy(update={"system_prompt": "", "default_max_tokens": 8, "max_output_tokens": 16, **config})
    return ServedProduct(config, tokenizer or Tokenizer(), MAX_MODEL_LEN, VOCAB, keys, system_prefix=[])


def _completion(**fields) -> oai.CompletionRequest:
    return oai.CompletionRequest.model_validate({"model": "support-chat", "prompt": [1, 2, 3], **fields})


def _chat(*messages: tuple[str, str], **fields) -> oai.ChatCompletionRequest:
    return oai.ChatCompletionRequest.model_validate(
        {"model": "support-chat", "messages": [{"role": r, "content": c} for r, c in messages], **fields})


def _refusal(fn, *args, **kwargs) -> APIError:
    with pytest.raises(APIError) as info:
        result = fn(*args, **kwargs)
        if asyncio.iscoroutine(result):
            asyncio.run(result)
    return info.value


# ---- the product and its key -------------------------------------------------------------------

def test_an_unknown_model_is_a_404_listing_the_models() -> None:
    preparer = RequestPreparer({"b": _product(), "a": _product()})
    error = _refusal(preparer.product, "gpt-4", "")
    assert (error.status, error.code, error.param) == (404, "model_not_found", "model")
    assert "['a', 'b']" in error.message


def test_a_keyed_product_opens_only_to_its_keys_and_an_open_one_to_anyone() -> None:
    keyed, open_ = _product(keys=frozenset({"sk-1"})), _product()
    preparer = RequestPreparer({"keyed": keyed, "open": open_})
    assert preparer.product("keyed", "sk-1") is keyed
    for key in ("", "sk-2"):
        error = _refusal(preparer.product, "keyed", key)
        assert (error.status, error.type, error.code) == (401, "authentication_error", "invalid_api_key")
    assert preparer.product("open", "") is open_ and preparer.product("open", "anything") is open_


# ---- tokens, off the event loop ----------------------------------------------------------------

def test_a_text_prompt_is_tokenized_off_the_event_loop_and_token_ids_pass_as_they_are() -> None:
    tokenizer = Tokenizer()
    product, preparer = _product(tokenizer), RequestPreparer({})
    job = asyncio.run(preparer.completion(product, _completion(prompt="hello"), ""))
    assert job.prompt_token_ids == [ord(c) % VOCAB for c in "hello"] and not job.chat
    assert tokenizer.threads == [tokenizer.threads[0]] and tokenizer.threads[0].startswith("pdserve-tokenize")
    job = asyncio.run(preparer.completion(product, _completion(prompt=[7, 8]), ""))
    assert job.prompt_token_ids == [7, 8] and len(tokenizer.threads) == 1


def test_chat_puts_the_products_system_prompt_first_and_a_developer_turn_as_system() -> None:
    tokenizer = Tokenizer()
    product = _product(tokenizer, system_prompt="Be brief.")
    req = _chat(("developer", "Use French."), ("user", "Hi"))
    job = asyncio.run(RequestPreparer({}).chat(product, req, ""))
    assert tokenizer.messages == [[{"role": "system", "content": "Be brief."}, {"role": "system", "content":
                                   "Use French."}, {"role": "user", "content": "Hi"}]]
    assert job.chat and tokenizer.threads[0].startswith("pdserve-tokenize")
    assert chat_messages(_chat(("user", "Hi")), None) == [{"role": "user", "content": "Hi"}]


def test_messages_the_chat_template_refuses_are_a_400() -> None:
    error = _refusal(RequestPreparer({}).chat, _product(Tokenizer(refuse=True)), _chat(("user", "Hi")), "")
    assert (error.status, error.param) == (400, "messages") and "roles must alternate" in error.message


# ---- limits --------------------------------------------------------------------------------------

def test_max_tokens_over_the_products_limit_is_a_400_and_none_takes_its_default() -> None:
    error = _refusal(prepare, _product(), _completion(), [1, 2], 17, chat=False)
    assert (error.status, error.param) == (400, "max_tokens") and "limit of 16" in error.message
    assert prepare(_product(), _completion(), [1, 2], None, chat=False).params.max_tokens == 8


def test_an_empty_prompt_is_a_400() -> None:
    assert _refusal(prepare, _product(), _completion(), [], 4, chat=False).param == "prompt"


@pytest.mark.parametrize("chat, param", [(False, "prompt"), (True, "messages")])
def test_a_request_longer_than_the_context_is_a_400(chat: bool, param: str) -> None:
    ids = [1] * (MAX_MODEL_LEN - 10)
    assert prepare(_product(), _completion(), ids, 10, chat=chat).params.max_tokens == 10  # exactly fits
    error = _refusal(prepare, _product(), _completion(), ids, 11, chat=chat)
    assert (error.status, error.code, error.param) == (400, "context_length_exceeded", param)
    assert "(90 in the prompt, 11 for the completion)" in error.message


def test_token_ids_outside_the_vocabulary_are_a_400() -> None:
    error = _refusal(prepare, _product(), _completion(), [1, VOCAB], 4, chat=False)
    assert (error.status, error.param) == (400, "prompt") and str(VOCAB) in error.message


def test_the_vocabulary_is_the_models_as_the_engines_check_it_not_the_tokenizers() -> None:
    """A model may take more ids than its tokenizer names (a padded embedding) or fewer: the ingress
    checks the model's own size, the one the engines check, so the two never disagree."""
    product = _product()
    wider = dataclasses.replace(product, vocab_size=2 * VOCAB)
    assert prepare(wider, _completion(), [VOCAB + 1], 4, chat=False).prompt_token_ids == [VOCAB + 1]
    narrower = dataclasses.replace(product, vocab_size=VOCAB // 2)
    assert _refusal(prepare, narrower, _completion(), [VOCAB // 2], 4, chat=False).status == 400


# ---- sampling parameters, seeds, cache namespaces ----------------------------------------------

def test_sampling_parameters_take_the_requests_values_or_the_defaults() -> None:
    params = prepare(_product(), _completion(), [1], 4, chat=False).params
    assert (params.temperature, params.top_p, params.top_k, params.seed, params.logprobs) == (1.0, 1.0, 0, None, None)
    req = _completion(temperature=0.0, top_p=0.5, top_k=3, seed=9, stop=["\n"], ignore_eos=True, logprobs=2)
    params = prepare(_product(), req, [1], 4, chat=False).params
    assert (params.temperature, params.top_p, params.top_k, params.seed) == (0.0, 0.5, 3, 9)
    assert (params.stop, params.ignore_eos, params.logprobs, params.n) == (("\n",), True, 2, 1)


def test_parameters_the_engine_refuses_are_a_400() -> None:
    req = oai.CompletionRequest.model_construct(model="support-chat", prompt=[1], top_p=0.0)  # past the API's check
    assert _refusal(prepare, _product(), req, [1], 4, chat=False).status == 400


def _job(**fields) -> PreparedRequest:
    return prepare(_product(), _completion(**fields), [1, 2], 4, chat=False)


def test_seeded_samples_run_with_consecutive_seeds_and_unseeded_ones_unseeded() -> None:
    job = _job(seed=41, n=3)
    requests = [job.sample_request(i) for i in range(job.n)]
    assert [r["sampling_params"].seed for r in requests] == [41, 42, 43]
    assert all(r["prompt_token_ids"] == [1, 2] and r["cache_salt"] == job.cache_salt for r in requests)
    assert requests[1]["sampling_params"].max_tokens == 4  # only the seed differs
    unseeded = _job(n=2)
    assert [unseeded.sample_request(i)["sampling_params"].seed for i in range(2)] == [None, None]


def test_each_sample_carries_its_products_slo_and_load_limits() -> None:
    product = _product(reject_past_ttft=2.0, decode_seat_share=0.75)
    request = prepare(product, _completion(), [1, 2], 4, chat=False).sample_request(0)
    assert request["slo"] == product.config.slo.model_dump()
    assert request["reject_past_s"] == 2.0 * product.config.slo.ttft_s and request["decode_seat_share"] == 0.75
    unlimited = _job().sample_request(0)
    assert unlimited["reject_past_s"] is None and unlimited["decode_seat_share"] is None


@pytest.mark.parametrize("share", [0.0, -0.5, 1.5])
def test_a_decode_seat_share_outside_0_to_1_is_refused_when_the_product_loads(share: float) -> None:
    with pytest.raises(ValueError, match="decode_seat_share"):
        tiny_products()["support-chat"].model_validate({"name": "p", "decode_seat_share": share})


def test_a_clients_cache_salt_is_narrowed_by_its_key_on_a_keyed_product_only() -> None:
    keyed = _product(keys=frozenset({"sk-1", "sk-2"}))

    def salt(product: ServedProduct, key: str, cache_salt: str | None) -> str:
        return prepare(product, _completion(cache_salt=cache_salt), [1], 4, chat=False, api_key=key).cache_salt

    assert salt(keyed, "sk-1", None) == salt(keyed, "sk-2", None) == keyed.config.salt
    assert salt(keyed, "sk-1", "t") != salt(keyed, "sk-2", "t")  # one tenant cannot reach another's salt
    assert salt(_product(), "sk-1", "t") == salt(_product(), "sk-2", "t") == salt(_product(), "", "t")


def test_the_tiny_models_product_loads_with_its_system_turn_and_context_limit() -> None:
    config = tiny_products()["support-chat"]
    product = load_product(config)
    assert product.system_prefix and product.max_model_len > 0 and len(product.tokenizer) > 0
    assert product.keys == config.resolved_api_keys() and product.admission.limit == config.max_queue_len

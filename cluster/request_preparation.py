"""Request preparation: from a parsed OpenAI request to the token ids and sampling parameters workers run.

Per request: the product its `model` names (404 unknown, 401 a key the product does not accept), the
prompt's tokens (completions) or the product's chat template over its system prompt and the messages
(chat), then the limits (max_tokens, context length, vocabulary) and the sampling parameters; every
refusal is a 400 before any engine work. Tokenizing and chat templates run on a thread of the preparer's
own, off the event loop: a long prompt takes milliseconds to tens of them, which on the loop would stall
every stream the replica serves. Sample i of a request's n runs with seed + i when the request is seeded:
reproducible, and no two samples alike.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

from cluster import openai_protocol as oai
from cluster.http_edge import APIError, describe
from cluster.served_product import ServedProduct
from engine.config import SamplingParams, error_message


@dataclass
class PreparedRequest:
    """A request checked against its product's limits, ready for the workers: n samples of one prompt."""

    product: ServedProduct
    prompt_token_ids: list[int]
    params: SamplingParams  # sample 0's; seeded samples differ by seed (sample_request)
    cache_salt: str  # the prefix-cache namespace of this product and tenant
    n: int
    stream: bool
    include_usage: bool
    chat: bool  # chat completions (else completions): the response's shape
    arrival: float = field(default_factory=time.monotonic)  # time.monotonic() seconds, for latencies

    def sample_request(self, index: int) -> dict:
        """The decode worker's request for sample index (0 to n - 1)."""
        params = self.params if self.params.seed is None else replace(self.params, seed=self.params.seed + index)
        config = self.product.config
        return {"prompt_token_ids": self.prompt_token_ids, "sampling_params": params, "cache_salt": self.cache_salt,
                "slo": config.slo.model_dump(), "reject_past_s": config.reject_past_s,
                "decode_seat_share": config.decode_seat_share}


class RequestPreparer:
    """Prepares the requests of these products; owns the tokenizing thread."""

    def __init__(self, products: dict[str, ServedProduct]) -> None:
        self._products = products
        # One thread: HF tokenizers are not safe to share between threads; one is enough to free the loop.
        self._tokenize_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pdserve-tokenize")

    def product(self, model: str, api_key: str) -> ServedProduct:
        """The product named model, when api_key (the request's bearer token, "" for none) opens it."""
        product = self._products.get(model)
        if product is None:
            raise APIError(404, f"The model `{model}` does not exist. Available: {sorted(self._products)}",
                           "invalid_request_error", "model_not_found", "model")
        if product.keys and api_key not in product.keys:
            raise APIError(401, "Incorrect or missing API key for this model.", "authentication_error",
                           "invalid_api_key")
        return product

    async def completion(self, product: ServedProduct, req: oai.CompletionRequest, api_key: str) -> PreparedRequest:
        ids = req.prompt if isinstance(req.prompt, list) else await self._off_loop(
            product.tokenizer.encode, req.prompt, add_special_tokens=False)
        return prepare(product, req, ids, req.max_tokens, chat=False, api_key=api_key)

    async def chat(self, product: ServedProduct, req: oai.ChatCompletionRequest, api_key: str) -> PreparedRequest:
        messages = chat_messages(req, product.config.system_prompt)
        try:
            ids = await self._off_loop(product.tokenizer.apply_chat_template, messages, tokenize=True,
                                       add_generation_prompt=True, return_dict=False)
        except Exception as exc:  # a template that refuses these messages (jinja's raise_exception): the client's
            raise APIError(400, f"the model's chat template refused these messages: {describe(exc)}",
                           param="messages") from exc
        return prepare(product, req, ids, req.requested_max_tokens, chat=True, api_key=api_key)

    async def _off_loop(self, fn: Callable, *args: Any, **kwargs: Any) -> Any:
        """fn(*args, **kwargs) on the tokenizing thread."""
        return await asyncio.get_running_loop().run_in_executor(self._tokenize_pool, lambda: fn(*args, **kwargs))


def chat_messages(req: oai.ChatCompletionRequest, system_prompt: str | None) -> list[dict[str, str]]:
    """The messages for the chat template: the product's system prompt first; a developer turn is a system one."""
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages]
    if system_prompt:
        messages = [{"role": "system", "content": system_prompt}, *messages]
    return messages


def prepare(product: ServedProduct, req: oai._SamplingFields, ids: list[int], max_tokens: int | None, chat: bool,
            api_key: str = "") -> PreparedRequest:
    """req with its prompt's token ids, checked against product's limits; max_tokens None: the product's default.
    api_key: the request's bearer token, which narrows its cache namespace on a product that asks for keys."""
    config = product.config
    max_tokens = max_tokens if max_tokens is not None else config.default_max_tokens
    if max_tokens > config.max_output_tokens:
        raise APIError(400, f"max_tokens is {max_tokens}, over this model's limit of "
                            f"{config.max_output_tokens} output tokens", param="max_tokens")
    if not ids:
        raise APIError(400, "The prompt is empty.", param="prompt")
    if len(ids) + max_tokens > product.max_model_len:
        raise APIError(400, f"This model's maximum context length is {product.max_model_len} tokens. However, "
                            f"you requested {len(ids) + max_tokens} tokens ({len(ids)} in the prompt, "
                            f"{max_tokens} for the completion).", code="context_length_exceeded",
                       param="messages" if chat else "prompt")
    vocab = product.vocab_size
    if any(t >= vocab for t in ids):
        raise APIError(400, f"prompt token ids must be below the vocabulary size {vocab}", param="prompt")
    try:
        params = SamplingParams(
            n=1, temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p, top_k=req.top_k or 0, seed=req.seed,
            max_tokens=max_tokens, stop=req.stop, ignore_eos=req.ignore_eos, logprobs=req.num_logprobs)
    except ValueError as exc:
        raise APIError(400, error_message(exc)) from exc
    # On an open product a key names no tenant (any client may send any key): its salts are anonymous.
    salt = config.tenant_salt(api_key if product.keys else None, req.cache_salt)
    return PreparedRequest(product, list(ids), params, salt, req.n, req.stream, req.include_usage, chat)

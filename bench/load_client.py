"""One streaming chat completion against any OpenAI-compatible endpoint, timed chunk by chunk.

Only the public OpenAI API is used (plus `ignore_eos`, which vLLM and pdserve both take), so the
same code measures pdserve and `vllm serve`. Outputs have the workload's lengths exactly: the
built-in models are random and would otherwise stop at an end token whenever they happen to draw it,
and two servers would then do different work for the same request.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any
from urllib.parse import urlsplit

import openai

from bench.load_stats import OK, RequestRecord
from bench.workload import ChatRequest

LOCAL_HOSTS = frozenset({"127.0.0.1", "localhost"})


def require_local(base_url: str) -> str:
    """`base_url` if its host is 127.0.0.1 or localhost; load tests never leave this machine."""
    parts = urlsplit(base_url)
    if parts.scheme not in ("http", "https") or parts.hostname not in LOCAL_HOSTS:
        raise ValueError(f"refusing to load {base_url!r}: load tests target http://127.0.0.1 or localhost only")
    return base_url


@dataclass(frozen=True)
class Endpoint:
    """Where and how to send: base URL (.../v1), product -> served model name, product -> API key.

    include_system: send the product's system prompt as a message. False for a server that adds it
    itself (pdserve's products do), True for a plain model server (vllm serve), so both see the same
    tokens. read_timeout_s: the longest wait for the next chunk, seconds.
    """

    base_url: str
    models: Mapping[str, str]
    api_keys: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    default_api_key: str = "EMPTY"
    include_system: bool = True
    read_timeout_s: float = 120.0
    temperature: float = 0.0
    ignore_eos: bool = True  # fixed output lengths (vLLM's and pdserve's extension); False: real answer lengths

    def __post_init__(self) -> None:
        require_local(self.base_url)


class ChatSender:
    """Callable(request, t0) -> RequestRecord for bench.load_dispatch; one AsyncOpenAI client per API key."""

    def __init__(self, endpoint: Endpoint) -> None:
        self._endpoint = endpoint
        self._clients: dict[str, openai.AsyncOpenAI] = {}

    def _client(self, product: str) -> openai.AsyncOpenAI:
        key = self._endpoint.api_keys.get(product, self._endpoint.default_api_key)
        if key not in self._clients:
            # max_retries=0: a retry would change the offered load (see bench/load_dispatch.py)
            self._clients[key] = openai.AsyncOpenAI(base_url=self._endpoint.base_url, api_key=key, max_retries=0,
                                                    timeout=self._endpoint.read_timeout_s)
        return self._clients[key]

    async def aclose(self) -> None:
        for client in self._clients.values():
            await client.close()

    async def __call__(self, request: ChatRequest, t0: float) -> RequestRecord:
        start = time.perf_counter()
        base = {"request_id": request.request_id, "product": request.product, "sent_s": start - t0}
        try:
            stream = await self._client(request.product).chat.completions.create(**self._body(request))
            timing = StreamTiming(start)
            async for chunk in stream:
                timing.observe(chunk)
        except openai.APIStatusError as exc:
            return RequestRecord(**base, outcome=str(exc.status_code), retry_after_s=_retry_after(exc),
                                 error=str(exc)[:300])
        except openai.APITimeoutError as exc:
            return RequestRecord(**base, outcome="timeout", error=str(exc)[:300])
        except openai.APIConnectionError as exc:
            return RequestRecord(**base, outcome="connection", error=str(exc)[:300])
        except openai.APIError as exc:  # an error event inside the stream
            return RequestRecord(**base, outcome="stream_error", error=str(exc)[:300])
        return timing.record(base)

    def _body(self, request: ChatRequest) -> dict[str, Any]:
        return {
            "model": self._endpoint.models[request.product],
            "messages": request.messages(include_system=self._endpoint.include_system),
            "max_tokens": request.max_tokens,
            "temperature": self._endpoint.temperature,
            "stream": True,
            "stream_options": {"include_usage": True},
            "extra_body": {"ignore_eos": self._endpoint.ignore_eos},
        }


class StreamTiming:
    """Chunk arrival times of one stream; usage from its last chunk when the server sends it."""

    def __init__(self, start: float) -> None:
        self._start = start
        self._content_times: list[float] = []
        self._usage: Any = None

    def observe(self, chunk: Any) -> None:
        now = time.perf_counter()
        if chunk.usage is not None:
            self._usage = chunk.usage
        # The first chunk of many servers carries only the role (empty content): not a token yet.
        if any(choice.delta is not None and choice.delta.content for choice in chunk.choices):
            self._content_times.append(now)

    def record(self, base: dict[str, Any]) -> RequestRecord:
        end = time.perf_counter()
        times = self._content_times
        if not times:
            return RequestRecord(**base, outcome="stream_error", e2e_s=end - self._start, error="no content in stream")
        tokens = self._usage.completion_tokens if self._usage is not None else len(times)
        details = getattr(self._usage, "prompt_tokens_details", None)
        return RequestRecord(
            **base, outcome=OK, ttft_s=times[0] - self._start, e2e_s=end - self._start,
            itl_s=tuple(b - a for a, b in zip(times, times[1:], strict=False)), output_tokens=tokens,
            prompt_tokens=self._usage.prompt_tokens if self._usage is not None else None,
            cached_tokens=getattr(details, "cached_tokens", None),
        )


def _retry_after(exc: openai.APIStatusError) -> float | None:
    try:
        return float(exc.response.headers.get("retry-after", ""))
    except (TypeError, ValueError):
        return None

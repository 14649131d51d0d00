"""OpenAI-compatible request and response shapes (the subset pdserve serves), as pydantic models.

Requests forbid nothing extra by default (OpenAI clients send fields we do not
use, e.g. `user`), but every field we use is typed and bounded so bad input
fails validation before any work is done.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, field_validator, model_validator

MAX_STOP_SEQUENCES = 4
MAX_N = 8
MAX_LOGPROBS = 20  # top alternatives per token, the engine's limit (vLLM's default max_logprobs)


# Fields of OpenAI's API that pdserve does not implement, with the values that ask for nothing (sending one of
# those is fine). Any other value is refused with a 400 naming the field: accepting and ignoring it would be
# a silent lie (a client asking for JSON output or a penalty would get neither, and not know).
UNIMPLEMENTED: dict[str, tuple[Any, ...]] = {
    "frequency_penalty": (None, 0, 0.0),
    "presence_penalty": (None, 0, 0.0),
    "repetition_penalty": (None, 1, 1.0),
    "logit_bias": (None, {}),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "functions": (None, []),
    "function_call": (None, "none"),
    "response_format": (None, {"type": "text"}),
    "best_of": (None, 1),
    "suffix": (None, ""),
    "modalities": (None, ["text"]),
    "audio": (None,),
    "prediction": (None,),
    "guided_json": (None,),
    "guided_regex": (None,),
    "guided_choice": (None,),
}


def unimplemented_field(body: dict[str, Any]) -> str | None:
    """The first field of `body` that asks for something pdserve does not do (None: nothing does)."""
    for name, inert in UNIMPLEMENTED.items():  # types compared too: False is not 0, nor 1.0 True
        if name in body and not any(type(body[name]) is type(v) and body[name] == v for v in inert):
            return name
    return None


class StreamOptions(BaseModel):
    include_usage: bool = False


class _SamplingFields(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1, max_length=256)
    max_tokens: int | None = Field(None, ge=1, le=1_000_000)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0, le=1_000_000)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False  # vLLM extension: benchmarks need exact output lengths
    cache_salt: str | None = Field(None, max_length=256)  # vLLM extension: a tenant namespace inside a product

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> list[str]:
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences, got {len(stops)}")
        if any(not s or len(s) > 256 for s in stops):
            raise ValueError("stop sequences must be 1 to 256 characters")
        return stops

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_SamplingFields):
    prompt: str | list[int] = Field(...)
    echo: bool = False
    logprobs: StrictInt | None = Field(None, ge=0, le=MAX_LOGPROBS)  # the sampled token's, plus this many top

    @property
    def num_logprobs(self) -> int | None:
        """Top alternatives per token to report (None: no logprobs)."""
        return self.logprobs

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: str | list[int]) -> str | list[int]:
        if isinstance(v, list) and any(t < 0 for t in v):
            raise ValueError("prompt token ids must be >= 0")
        return v

    @model_validator(mode="after")
    def _no_echo(self) -> CompletionRequest:
        if self.echo:
            raise ValueError("echo is not supported")
        return self


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1, max_length=1024)
    max_completion_tokens: int | None = Field(None, ge=1, le=1_000_000)
    logprobs: StrictBool | None = None
    top_logprobs: StrictInt | None = Field(None, ge=0, le=MAX_LOGPROBS)

    @model_validator(mode="after")
    def _top_needs_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:  # as OpenAI: top_logprobs alone asks for nothing coherent
            raise ValueError("top_logprobs needs logprobs set to true")
        return self

    @property
    def num_logprobs(self) -> int | None:
        """Top alternatives per token to report (None: no logprobs)."""
        return (self.top_logprobs or 0) if self.logprobs else None

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


# ---- responses (plain dicts: built per chunk on the hot path) -----------------------------------------

def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def completion_chunk(rid: str, model: str, created: int, index: int, text: str, finish_reason: str | None,
                     logprobs: dict | None = None) -> dict:
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}]}


def chat_chunk(rid: str, model: str, created: int, index: int, delta: dict, finish_reason: str | None,
               logprobs: dict | None = None) -> dict:
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}]}


def usage_chunk(rid: str, model: str, created: int, obj: str, usage_dict: dict) -> dict:
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [], "usage": usage_dict}


def completion_response(rid: str, model: str, choices: list[tuple[str, str, dict | None]], usage_dict: dict) -> dict:
    """choices: (text, finish reason, logprobs or None) per sample."""
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": i, "text": text, "logprobs": logprobs, "finish_reason": reason}
                        for i, (text, reason, logprobs) in enumerate(choices)],
            "usage": usage_dict}


def chat_response(rid: str, model: str, choices: list[tuple[str, str, dict | None]], usage_dict: dict) -> dict:
    """choices: (text, finish reason, logprobs or None) per sample."""
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": i, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                         "finish_reason": reason} for i, (text, reason, logprobs) in enumerate(choices)],
            "usage": usage_dict}


def error_body(message: str, type_: str, code: str | int | None = None, param: str | None = None) -> dict:
    """OpenAI's error JSON shape."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def models_list(names: list[str], created: int) -> dict:
    return {"object": "list", "data": [{"id": n, "object": "model", "created": created, "owned_by": "pdserve"}
                                       for n in names]}

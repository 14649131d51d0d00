"""The offline entry point: `LLM(model).generate(prompts, sampling_params)`, vLLM style."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from engine.config import EngineConfig, SamplingParams
from engine.engine import Engine
from engine.outputs import CompletionOutput, EngineStats, RequestOutput
from engine.request import Request

Prompt = str | list[int] | dict[str, Any]


class LLM:
    """A local engine. `model`: a name, a .gguf file or a Hugging Face folder (engine/models.py); None: `tiny`.

    Extra keyword arguments are EngineConfig fields (block_size, kv_cache_bytes,
    max_num_seqs, max_num_batched_tokens, enable_prefix_caching, ...).
    """

    def __init__(self, model: str | None = None, **config: Any) -> None:
        self.engine = Engine(EngineConfig(model=model, **config))
        self.tokenizer = self.engine.tokenizer

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[RequestOutput]:
        """Run prompts to completion; outputs come back in prompt order.

        A prompt is a string, a list of token ids, or a dict with "prompt" or
        "prompt_token_ids" and optionally "cache_salt". All prompts are
        validated before any is queued, so a bad one queues nothing.
        """
        if isinstance(prompts, (str, dict)) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        params_list = ([sampling_params] * len(prompts) if isinstance(sampling_params, SamplingParams)
                       else list(sampling_params))
        if len(params_list) != len(prompts):
            raise ValueError(f"got {len(params_list)} sampling_params for {len(prompts)} prompts")
        parsed = [self._parse(p) for p in prompts]
        for (token_ids, _, _), params in zip(parsed, params_list, strict=True):
            self.engine.validate(token_ids, params)
        groups: list[tuple[str | None, list[int], list[Request]]] = []
        for (token_ids, salt, text), params in zip(parsed, params_list, strict=True):
            groups.append((text, token_ids, [self.engine.add_request(token_ids, p, cache_salt=salt)
                                             for p in _fan_out(params)]))
        while self.engine.has_unfinished_requests():
            self.engine.step()
        return [self._output(text, token_ids, reqs) for text, token_ids, reqs in groups]

    def stats(self) -> EngineStats:
        return self.engine.stats()

    def _parse(self, prompt: Prompt) -> tuple[list[int], str | None, str | None]:
        if isinstance(prompt, dict):
            salt = prompt.get("cache_salt")
            if "prompt_token_ids" in prompt:
                return list(prompt["prompt_token_ids"]), salt, None
            return self.engine.tokenize(prompt["prompt"]), salt, prompt["prompt"]
        if isinstance(prompt, str):
            return self.engine.tokenize(prompt), None, prompt
        return list(prompt), None, None

    def _output(self, text: str | None, token_ids: list[int], reqs: list[Request]) -> RequestOutput:
        outputs = [
            CompletionOutput(index=i, text=self.engine.output_text(r), token_ids=list(r.output_token_ids),
                             finish_reason=r.status.value, stop_reason=r.stop_reason,
                             logprobs=r.output_logprobs if r.sampling_params.logprobs is not None else None)
            for i, r in enumerate(reqs)
        ]
        return RequestOutput(request_id=reqs[0].request_id, prompt=text, prompt_token_ids=token_ids,
                             num_cached_tokens=max(reqs[0].num_cached_tokens, 0), outputs=outputs, finished=True)


def _fan_out(params: SamplingParams) -> list[SamplingParams]:
    """n samples of one prompt become n sequences; they share the prompt's full blocks via the
    prefix cache (the first one's blocks are published when allocated). Child i gets seed + i."""
    if params.n == 1:
        return [params]
    return [replace(params, n=1, seed=None if params.seed is None else params.seed + i) for i in range(params.n)]

"""Response assembly: a request's sample streams of StepOutput dicts become one OpenAI answer.

Streamed, as server-sent events: per sample (choice index i) the chat role first, then text deltas
(incremental detokenization: never half a character, never a stop string) with their logprobs, then the
finish reason; the samples' chunks interleave as their outputs arrive; then the usage chunk when asked,
and `data: [DONE]`. A worker failing mid-stream ends the events with an error event (the status is long
sent). Whole, as one JSON body: every sample's outputs merged, choices in sample order.

Latencies observed per request, in seconds: time to first token (the first output of every sample),
inter-token latency (each step's gap, once per token it brought), end to end; and the finish reasons.
The request's admission is released when its answer ends, however it ends.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

from fastapi.responses import JSONResponse, Response

from cluster import openai_protocol as oai
from cluster.admission import Release, ReleasingStreamingResponse
from cluster.detokenizer import IncrementalDetokenizer
from cluster.logprobs import LogprobFormatter
from cluster.request_preparation import PreparedRequest
from cluster.worker_streams import close, first_output, rest_outputs, worker_failure


async def respond(job: PreparedRequest, streams: list[AsyncIterator[dict]], release: Release) -> Response:
    """The answer to job from its samples' streams (one per sample, in order): SSE or JSON, as it asked.
    A failure before every sample's first output is raised as an APIError, with the streams released."""
    try:
        firsts = await asyncio.gather(*(first_output(s) for s in streams))
    except BaseException:  # a failed sample, or the client gone (cancelled): end the others too
        await release(finished=False)
        raise
    first_at = time.monotonic()
    job.product.stats.ttft.observe(first_at - job.arrival)
    clocks = [TokenClock(job, first_at, len(first["new_token_ids"])) for first in firsts]
    if job.stream:
        return ReleasingStreamingResponse(sse_events(job, streams, firsts, clocks, release), release)
    finished = False
    try:
        body = await json_answer(job, streams, firsts, clocks)
        finished = True
        return JSONResponse(body)
    finally:
        await release(finished)


class TokenClock:
    """Times one sample's token arrivals for the inter-token latency histogram."""

    def __init__(self, job: PreparedRequest, first_at: float, first_tokens: int) -> None:
        """first_at: when the first output came (time.monotonic() seconds), with first_tokens tokens."""
        self.itl, self.last = job.product.stats.itl, first_at
        # A stream that fell behind gets its waiting tokens merged, the first message included: the tokens
        # that came with the first one arrived with it (gaps of ~0), so every token but the first is observed.
        self.tick(first_tokens - 1)

    def tick(self, num_tokens: int) -> None:
        """num_tokens arrived now: the gap since the last arrival, split evenly between them."""
        if num_tokens <= 0:
            return
        now = time.monotonic()
        for _ in range(num_tokens):
            self.itl.observe((now - self.last) / num_tokens)
        self.last = now


def _observe_end(job: PreparedRequest, finish_reasons: list[str]) -> None:
    stats = job.product.stats
    stats.e2e.observe(time.monotonic() - job.arrival)
    stats.finished.update(finish_reasons)


def _logprobs(job: PreparedRequest, out: dict, formatter: LogprobFormatter | None = None) -> dict | None:
    """The OpenAI logprobs of out's tokens (None when the request asked for none)."""
    if job.params.logprobs is None or out["new_logprobs"] is None:
        return None
    formatter = formatter or LogprobFormatter(job.product.tokenizer, job.params.logprobs)
    shape = formatter.chat if job.chat else formatter.completion
    return shape(out["new_token_ids"], out["new_logprobs"])


# ---- one JSON body -------------------------------------------------------------------------------

async def json_answer(job: PreparedRequest, streams: list, firsts: list[dict], clocks: list[TokenClock]) -> dict:
    """The whole answer: each sample read to its end and merged, then the choices in sample order."""
    outs = await asyncio.gather(*(_merged(s, f, c) for s, f, c in zip(streams, firsts, clocks, strict=True)))
    _observe_end(job, [o["finish_reason"] for o in outs])
    choices = [(o["text"] or "", o["finish_reason"], _logprobs(job, o)) for o in outs]
    completion = sum(o["num_output_tokens"] for o in outs)
    u = oai.usage(len(job.prompt_token_ids), completion, firsts[0]["num_cached_tokens"])
    rid = oai.new_id("chatcmpl" if job.chat else "cmpl")
    name = job.product.config.name
    return oai.chat_response(rid, name, choices, u) if job.chat else oai.completion_response(rid, name, choices, u)


async def _merged(stream: AsyncIterator[dict], first: dict, clock: TokenClock) -> dict:
    """A sample's outputs merged into one: the last output, with every token id (and logprob, when asked)
    since the first in new_token_ids (new_logprobs)."""
    outs = [first]
    if not first["finished"]:
        try:
            async for out in rest_outputs(stream):
                clock.tick(len(out["new_token_ids"]))
                outs.append(out)
        except Exception as exc:
            raise worker_failure(exc, " mid-request") from exc
    last = outs[-1]
    logprobs = None if first["new_logprobs"] is None else [lp for o in outs for lp in o["new_logprobs"] or []]
    return {**last, "num_output_tokens": max(first["num_output_tokens"], last["num_output_tokens"]),
            "new_token_ids": [t for o in outs for t in o["new_token_ids"]], "new_logprobs": logprobs}


# ---- server-sent events --------------------------------------------------------------------------

async def sse_events(job: PreparedRequest, streams: list, firsts: list[dict], clocks: list[TokenClock],
                     release: Release) -> AsyncIterator[str]:
    """The answer's events, each `data: <json>\n\n`; releases the request when it ends."""
    events = _Events(job, len(streams))
    queue: asyncio.Queue = asyncio.Queue()
    pumps = [asyncio.ensure_future(_pump(i, s, f, queue, c))
             for i, (s, f, c) in enumerate(zip(streams, firsts, clocks, strict=True))]
    reasons: list[str] = []
    completion_tokens, live, finished = 0, len(streams), False
    try:
        for event in events.roles():
            yield event
        while live:
            index, out = await queue.get()
            if isinstance(out, BaseException):
                yield events.error(out)
                break
            if out["finished"]:
                completion_tokens += out["num_output_tokens"]
                reasons.append(out["finish_reason"])
                live -= 1
            event = events.output(index, out)
            if event:
                yield event
        else:
            finished = True
            _observe_end(job, reasons)
            if job.include_usage:
                yield events.usage(completion_tokens, firsts[0]["num_cached_tokens"])
        yield "data: [DONE]\n\n"
    finally:
        for pump in pumps:
            pump.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)
        await release(finished)


class _Events:
    """The events of one streamed answer, in its shape (chat or completions), under one id and creation time."""

    def __init__(self, job: PreparedRequest, samples: int) -> None:
        self.job, self.name = job, job.product.config.name
        self.rid, self.created = oai.new_id("chatcmpl" if job.chat else "cmpl"), int(time.time())
        tokenizer, params = job.product.tokenizer, job.params
        self.detoks = [IncrementalDetokenizer(tokenizer, params.stop) for _ in range(samples)]
        self.formatters = [LogprobFormatter(tokenizer, params.logprobs or 0) for _ in range(samples)]

    def roles(self) -> list[str]:
        """Chat's first event per sample: the assistant's role (completions have none)."""
        return [sse_line(oai.chat_chunk(self.rid, self.name, self.created, i, {"role": "assistant", "content": ""},
                                        None)) for i in range(len(self.detoks))] if self.job.chat else []

    def output(self, index: int, out: dict) -> str | None:
        """Sample index's event for out: its new text, finish reason and logprobs (None: nothing to send)."""
        detok = self.detoks[index]
        # The finishing output's tokens may complete a stop string: only the engine's final text (cut before
        # it) may follow what was sent, so its tokens do not go through add(), which would release the
        # held-back start of the stop string.
        finished_text = out["text"] if out["finished"] else None
        text = detok.add(out["new_token_ids"]) if finished_text is None else detok.finish(finished_text)
        reason = out["finish_reason"] if out["finished"] else None
        logprobs = _logprobs(self.job, out, self.formatters[index]) if out["new_token_ids"] else None
        if not (text or reason or logprobs):
            return None
        if self.job.chat:
            delta = {"content": text} if text else {}
            return sse_line(oai.chat_chunk(self.rid, self.name, self.created, index, delta, reason, logprobs))
        return sse_line(oai.completion_chunk(self.rid, self.name, self.created, index, text, reason, logprobs))

    def usage(self, completion_tokens: int, cached_tokens: int) -> str:
        u = oai.usage(len(self.job.prompt_token_ids), completion_tokens, cached_tokens)
        obj = "chat.completion.chunk" if self.job.chat else "text_completion"
        return sse_line(oai.usage_chunk(self.rid, self.name, self.created, obj, u))

    @staticmethod
    def error(exc: BaseException) -> str:
        """A worker's failure mid-stream: the status is long sent, so the error is an event."""
        error = worker_failure(exc, " mid-request")
        return sse_line(oai.error_body(error.message, error.type, error.code))


async def _pump(index: int, stream: AsyncIterator[dict], first: dict, queue: asyncio.Queue,
                clock: TokenClock) -> None:
    """Put sample index's outputs on queue as (index, output), the first included; a failure as
    (index, exception). Cancelled, it closes the stream."""
    await queue.put((index, first))
    if first["finished"]:
        return
    try:
        async for out in rest_outputs(stream):
            clock.tick(len(out["new_token_ids"]))
            await queue.put((index, out))
    except asyncio.CancelledError:
        await close(stream)
        raise
    except Exception as exc:
        await queue.put((index, exc))


def sse_line(obj: dict) -> str:
    """One server-sent event carrying obj as compact JSON."""
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"

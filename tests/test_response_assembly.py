"""Response assembly on its own (no Ray, no workers): fake sample streams of StepOutput dicts become OpenAI
JSON bodies and server-sent events; n samples merge by index; text is detokenized incrementally; logprobs,
usage and the latency metrics are right; the request is released however its answer ends."""

from __future__ import annotations

import asyncio
import json

import pytest
from fastapi.responses import JSONResponse

from cluster import openai_protocol as oai
from cluster.admission import Release, ReleasingStreamingResponse
from cluster.http_edge import APIError
from cluster.request_preparation import prepare
from cluster.response_assembly import TokenClock, respond
from cluster.served_product import ServedProduct
from tests.cluster_helpers import tiny_products

PROMPT = [1, 2, 3, 4, 5]


class Tokenizer:
    """Token i is the letter chr(ord('a') + i); no fast backend, so the detokenizer decodes windows."""

    def __len__(self) -> int:
        return 26

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(ord("a") + i) for i in ids)


class Stream:
    """A sample's stream: these outputs, then its end or a failure; records being cancelled."""

    def __init__(self, outputs: list[dict], fail: BaseException | None = None) -> None:
        self.outputs, self.fail, self.cancelled = list(outputs), fail, False

    def __aiter__(self) -> Stream:
        return self

    async def __anext__(self) -> dict:
        await asyncio.sleep(0)
        if self.outputs:
            return self.outputs.pop(0)
        if self.fail is not None:
            raise self.fail
        raise StopAsyncIteration

    def cancel(self) -> None:
        self.cancelled = True


def _out(ids: list[int], done: int, finished: bool = False, reason: str | None = None, text: str | None = None,
         logprobs: list[dict[int, float]] | None = None) -> dict:
    """A StepOutput as a dict: ids new this step, done output tokens so far."""
    return {"request_id": "r", "new_token_ids": ids, "new_logprobs": logprobs, "num_prompt_tokens": len(PROMPT),
            "num_cached_tokens": 2, "num_output_tokens": done, "finished": finished, "finish_reason": reason,
            "stop_reason": None, "text": text}


def _sample(letters: str, reason: str = "stop", steps: int = 2) -> list[dict]:
    """A sample generating letters in outputs of `steps` tokens; the last output carries the whole text."""
    ids = [ord(c) - ord("a") for c in letters]
    chunks = [ids[i:i + steps] for i in range(0, len(ids), steps)]
    return [_out(c, sum(map(len, chunks[:k + 1])), k == len(chunks) - 1, reason if k == len(chunks) - 1 else None,
                 letters if k == len(chunks) - 1 else None) for k, c in enumerate(chunks)]


def _job(chat: bool = False, stream: bool = False, n: int = 1, **fields):
    config = tiny_products()["support-chat"]
    product = ServedProduct(config, Tokenizer(), 256, 8192, frozenset(), [])
    req = oai.CompletionRequest.model_validate({"model": config.name, "prompt": PROMPT, "n": n, "stream": stream,
                                                **fields})
    job = prepare(product, req, PROMPT, 16, chat=chat)
    product.admission.admit(n)
    return job


async def _answer(job, streams: list[Stream]) -> dict | list[dict | str]:
    """The JSON body, or the SSE events (parsed, and "[DONE]") read to their end."""
    response = await respond(job, streams, Release(job.product.admission, streams))
    if isinstance(response, JSONResponse):
        return json.loads(response.body)
    assert isinstance(response, ReleasingStreamingResponse)
    events = [e async for e in response.body_iterator]
    assert all(e.startswith("data: ") and e.endswith("\n\n") for e in events)
    return [e[6:-2] if e == "data: [DONE]\n\n" else json.loads(e[6:-2]) for e in events]


# ---- one JSON body -------------------------------------------------------------------------------

def test_n_samples_merge_into_one_completion_body_in_sample_order() -> None:
    job = _job(n=2)
    streams = [Stream(_sample("hello")), Stream(_sample("abc", reason="length"))]
    body = asyncio.run(_answer(job, streams))
    assert body["object"] == "text_completion" and body["model"] == "support-chat"
    assert [(c["index"], c["text"], c["finish_reason"], c["logprobs"]) for c in body["choices"]] == [
        (0, "hello", "stop", None), (1, "abc", "length", None)]
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 8, "total_tokens": 13,
                             "prompt_tokens_details": {"cached_tokens": 2}}
    assert job.product.admission.inflight == 0 and not any(s.cancelled for s in streams)
    stats = job.product.stats
    assert (stats.ttft.snapshot().count, stats.e2e.snapshot().count) == (1, 1)
    assert stats.itl.snapshot().count == (5 - 1) + (3 - 1)  # every token but each sample's first
    assert stats.finished == {"stop": 1, "length": 1}


def test_a_chat_body_carries_the_logprobs_of_every_output() -> None:
    job = _job(chat=True, logprobs=1)  # a chat request's top_logprobs=1 prepares the same way
    lp = [{7: -0.1, 8: -2.0}, {8: -0.2, 7: -1.0}, {9: -0.3, 7: -float("inf")}]
    outputs = [_out([7], 1, logprobs=lp[:1]), _out([8, 9], 3, True, "stop", "hij", lp[1:])]
    body = asyncio.run(_answer(job, [Stream(outputs)]))
    choice = body["choices"][0]
    assert body["object"] == "chat.completion" and choice["message"] == {"role": "assistant", "content": "hij"}
    content = choice["logprobs"]["content"]
    assert [(e["token"], e["logprob"]) for e in content] == [("h", -0.1), ("i", -0.2), ("j", -0.3)]
    assert [[t["token"] for t in e["top_logprobs"]] for e in content] == [["h"], ["i"], ["j"]]


def test_a_worker_failing_mid_request_is_a_503_and_closes_every_sample() -> None:
    job = _job(n=2)
    streams = [Stream(_sample("abcd")), Stream(_sample("abcd")[:1], fail=RuntimeError("replica died"))]
    with pytest.raises(APIError) as info:
        asyncio.run(_answer(job, streams))
    assert (info.value.status, info.value.code) == (503, "worker_failed") and "mid-request" in info.value.message
    assert job.product.admission.inflight == 0 and all(s.cancelled for s in streams)


def test_a_sample_without_a_first_output_fails_the_request_and_releases_it() -> None:
    job = _job(n=2, stream=True)
    streams = [Stream(_sample("ab")), Stream([])]
    with pytest.raises(APIError) as info:
        asyncio.run(_answer(job, streams))
    assert info.value.status == 503
    assert job.product.admission.inflight == 0 and all(s.cancelled for s in streams)
    assert job.product.stats.ttft.snapshot().count == 0


# ---- server-sent events --------------------------------------------------------------------------

def _texts(events: list, key) -> dict[int, str]:
    texts: dict[int, str] = {}
    for e in events:
        if isinstance(e, dict) and e.get("choices"):
            choice = e["choices"][0]
            texts[choice["index"]] = texts.get(choice["index"], "") + (key(choice) or "")
    return texts


def test_chat_events_role_first_then_deltas_then_finish_usage_and_done() -> None:
    job = _job(chat=True, stream=True, n=2, stream_options={"include_usage": True})
    events = asyncio.run(_answer(job, [Stream(_sample("hello")), Stream(_sample("xyz", reason="length"))]))
    assert [e["choices"][0]["delta"] for e in events[:2]] == [{"role": "assistant", "content": ""}] * 2
    assert [e["choices"][0]["index"] for e in events[:2]] == [0, 1]
    assert _texts(events[2:], lambda c: c["delta"].get("content")) == {0: "hello", 1: "xyz"}
    finishes = [(e["choices"][0]["index"], e["choices"][0]["finish_reason"]) for e in events[2:-2]
                if e["choices"][0]["finish_reason"]]
    assert sorted(finishes) == [(0, "stop"), (1, "length")]
    assert len({e["id"] for e in events[:-1]}) == 1 and events[0]["object"] == "chat.completion.chunk"
    usage = events[-2]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 8 and usage["object"] == \
        "chat.completion.chunk"
    assert events[-1] == "[DONE]"
    assert job.product.admission.inflight == 0 and job.product.stats.finished == {"stop": 1, "length": 1}


def _stopped_at_xy() -> tuple[list[dict | str], list[dict | str]]:
    """The events of a sample the engine stopped at the stop string "xy" ("abxy" generated, text "ab")."""
    job = _job(stream=True, stop=["xy"])
    outputs = [_out([0], 1), _out([1], 2), _out([23], 3), _out([24], 4, True, "stop", "ab")]
    events = asyncio.run(_answer(job, [Stream(outputs)]))
    return events[:-2], events[-2:]


def test_completion_events_hold_back_what_may_start_a_stop_string() -> None:
    before, (last, done) = _stopped_at_xy()
    assert [e["choices"][0]["text"] for e in before] == ["a", "b"]  # "x" waits: it may start "xy"
    assert last["choices"][0]["finish_reason"] == "stop" and last["object"] == "text_completion"
    assert done == "[DONE]"


def test_a_stop_string_never_reaches_the_stream() -> None:
    before, (last, _) = _stopped_at_xy()
    assert "".join(e["choices"][0]["text"] for e in [*before, last]) == "ab"


def test_completion_events_carry_logprobs_with_running_text_offsets() -> None:
    job = _job(stream=True, logprobs=0)
    outputs = [_out([0, 1], 2, logprobs=[{0: -0.5}, {1: -0.25}]), _out([2], 3, True, "stop", "abc", [{2: -1.0}])]
    events = asyncio.run(_answer(job, [Stream(outputs)]))
    logprobs = [e["choices"][0]["logprobs"] for e in events[:-1]]
    assert [lp["tokens"] for lp in logprobs] == [["a", "b"], ["c"]]
    assert [lp["text_offset"] for lp in logprobs] == [[0, 1], [2]]
    assert [lp["token_logprobs"] for lp in logprobs] == [[-0.5, -0.25], [-1.0]]


def test_a_worker_failing_mid_stream_ends_the_events_with_an_error_and_closes_every_sample() -> None:
    job = _job(stream=True, n=2, stream_options={"include_usage": True})
    streams = [Stream(_sample("abcdefgh", steps=1)), Stream([_out([0], 1)], fail=RuntimeError("replica died"))]
    events = asyncio.run(_answer(job, streams))
    errors = [e for e in events if isinstance(e, dict) and "error" in e]
    assert len(errors) == 1 and errors[0]["error"]["code"] == "worker_failed"
    assert events[-1] == "[DONE]" and not any(isinstance(e, dict) and "usage" in e for e in events)
    assert job.product.admission.inflight == 0 and all(s.cancelled for s in streams)
    assert job.product.stats.e2e.snapshot().count == 0  # a failed request is no finished one


def test_a_client_leaving_mid_stream_releases_the_request_and_closes_its_samples() -> None:
    async def scenario():
        job = _job(stream=True, n=2)
        streams = [Stream(_sample("abcdef", steps=1)), Stream(_sample("abcdef", steps=1))]
        response = await respond(job, streams, Release(job.product.admission, streams))
        body = response.body_iterator
        await body.__anext__()
        await body.aclose()  # what the server does when the client goes
        return job, streams

    job, streams = asyncio.run(scenario())
    assert job.product.admission.inflight == 0 and all(s.cancelled for s in streams)


# ---- token clocks ------------------------------------------------------------------------------

def test_a_token_clock_observes_every_token_but_the_first() -> None:
    job = _job()
    itl = job.product.stats.itl
    clock = TokenClock(job, job.arrival, first_tokens=3)  # a first output that brought 3 tokens
    assert itl.snapshot().count == 2
    clock.tick(0)
    assert itl.snapshot().count == 2
    clock.tick(4)
    snapshot = itl.snapshot()
    assert snapshot.count == 6 and snapshot.sum >= 0.0 and clock.last >= job.arrival

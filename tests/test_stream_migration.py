"""Migration on its own (no Ray cluster): a sample whose replica dies resumes on another with the tokens
already delivered, and the answer reads as one uninterrupted run; a request-level failure is not migrated;
past the migration limit (no replica left to take it) the stream ends with the clean error event."""

from __future__ import annotations

import asyncio

import pytest
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayTaskError

from cluster.http_edge import APIError
from cluster.stream_migration import MAX_MIGRATIONS, MAX_SPILLS, MigratingStream, replica_died
from cluster.worker_streams import first_output
from decode_workers.token_stream import TokenStreamError
from engine.async_engine import EngineDeadError, RequestFailedError
from engine.scheduler import OverloadedError
from tests.test_response_assembly import Stream, _answer, _job, _out

REQUEST = {"prompt_token_ids": [1, 2, 3], "sampling_params": {"max_tokens": 8}, "reject_past_s": 2.0,
           "decode_seat_share": 0.8}


class Replicas:
    """Opens each request on the next of these streams (one per replica it lands on), recording the requests."""

    def __init__(self, streams: list[Stream]) -> None:
        self.streams, self.requests, self.migrations, self.spills = list(streams), [], 0, 0

    def open(self, request: dict) -> Stream:
        self.requests.append(request)
        return self.streams[len(self.requests) - 1]

    def count(self) -> None:
        self.migrations += 1

    def count_spill(self) -> None:
        self.spills += 1

    def stream(self) -> MigratingStream:
        return MigratingStream(self.open, REQUEST, self.count, on_spill=self.count_spill)


def _died_after_abc() -> list[Stream]:
    """"abcdefgh" in 8 tokens: the first replica delivers a, b, c and dies; the second delivers the rest,
    its counts and final text covering the whole output (what a resumed engine sends)."""
    first = Stream([_out([0, 1], 2), _out([2], 3)], fail=ActorDiedError())
    rest = Stream([_out([3, 4], 5), _out([5, 6], 7), _out([7], 8, True, "length", "abcdefgh")])
    return [first, rest]


def test_a_stream_resumes_after_the_delivered_tokens_and_reads_as_one_run() -> None:
    replicas = Replicas(_died_after_abc())
    job = _job(stream=True, stream_options={"include_usage": True})
    events = asyncio.run(_answer(job, [replicas.stream()]))
    assert not any("error" in e for e in events if isinstance(e, dict))
    assert "".join(e["choices"][0]["text"] for e in events if isinstance(e, dict) and e["choices"]) == "abcdefgh"
    usage = next(e["usage"] for e in events if isinstance(e, dict) and e.get("usage"))
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (5, 8)
    resumed = replicas.requests[1]
    assert resumed["resume_token_ids"] == [0, 1, 2] and resumed["reject_past_s"] is None
    assert resumed["decode_seat_share"] is None
    assert resumed["prompt_token_ids"] == REQUEST["prompt_token_ids"]  # the prompt itself, not re-tokenized text
    assert replicas.migrations == 1 and replicas.streams[0].cancelled


def test_a_whole_json_answer_survives_a_migration() -> None:
    body = asyncio.run(_answer(_job(), [Replicas(_died_after_abc()).stream()]))
    assert body["choices"][0]["text"] == "abcdefgh" and body["usage"]["completion_tokens"] == 8


def test_a_death_before_the_first_output_resumes_from_nothing() -> None:
    unreachable = ActorUnavailableError("replica unreachable", None)
    replicas = Replicas([Stream([], fail=unreachable), Stream(_died_after_abc()[1].outputs)])
    body = asyncio.run(_answer(_job(), [replicas.stream()]))
    assert body["choices"][0]["text"] == "abcdefgh"  # this fake's second replica sends what follows "abc"
    assert replicas.requests[1]["resume_token_ids"] == []


def _refused_by(worker: str) -> Stream:
    """A replica whose engine refuses the sample for load before any output, as Ray delivers it."""
    refusal = OverloadedError("17 requests would decode where the ITL targets and max_num_seqs allow 16", 2.0, worker)
    return Stream([], fail=RayTaskError("generate", "", refusal).as_instanceof_cause())


def test_a_sample_one_engine_refuses_for_load_goes_to_another_replica() -> None:
    replicas = Replicas([_refused_by("decode#a"), Stream([_out([0], 1, True, "stop", "a")])])
    stream = replicas.stream()
    first = asyncio.run(first_output(stream))
    assert first["new_token_ids"] == [0] and stream.spills == replicas.spills == 1 and replicas.migrations == 0
    assert replicas.streams[0].cancelled
    assert replicas.requests[1] == {**REQUEST, "avoid_workers": ["decode#a"]}  # the same limits, elsewhere


def test_past_the_spill_limit_the_last_refusal_is_the_answer() -> None:
    replicas = Replicas([_refused_by(f"decode#{i}") for i in range(MAX_SPILLS + 2)])
    with pytest.raises(APIError) as info:
        asyncio.run(first_output(replicas.stream()))
    assert info.value.status == 429 and int(info.value.headers["Retry-After"]) == 2
    assert len(replicas.requests) == MAX_SPILLS + 1 and replicas.spills == MAX_SPILLS
    assert replicas.requests[-1]["avoid_workers"] == [f"decode#{i}" for i in range(MAX_SPILLS)]


@pytest.mark.parametrize("exc, died", [
    (ActorDiedError(), True),
    (ActorUnavailableError("replica unreachable", None), True),
    (RayTaskError("generate", "", EngineDeadError("step failed")).as_instanceof_cause(), True),
    (RayTaskError("generate", "", RequestFailedError("NaN logits")).as_instanceof_cause(), False),
    (RayTaskError("generate", "", ValueError("bad prompt")).as_instanceof_cause(), False),
    (OverloadedError("predicted time to first token 5.00 s is past 1.00 s", 4.0), False),  # no worker: a prefill's
    (TokenStreamError("no output within 300 s"), False),
])
def test_only_a_replica_death_migrates(exc: BaseException, died: bool) -> None:
    assert replica_died(exc) is died
    if died:
        return
    replicas = Replicas([Stream([_out([0], 1)], fail=exc), Stream(_died_after_abc()[1].outputs)])
    events = asyncio.run(_answer(_job(stream=True), [replicas.stream()]))
    assert len(replicas.requests) == 1 and replicas.migrations == 0
    assert any("error" in e for e in events if isinstance(e, dict))


def test_with_no_replica_left_the_stream_ends_with_the_clean_error_event() -> None:
    dying = [Stream([_out([i], i + 1)], fail=ActorDiedError()) for i in range(MAX_MIGRATIONS + 1)]
    replicas = Replicas(dying)
    job = _job(stream=True, stream_options={"include_usage": True})
    events = asyncio.run(_answer(job, [replicas.stream()]))
    errors = [e["error"] for e in events if isinstance(e, dict) and "error" in e]
    assert len(errors) == 1 and (errors[0]["code"], errors[0]["type"]) == ("worker_failed", "server_error")
    assert "worker failed mid-request" in errors[0]["message"]
    assert events[-1] == "[DONE]" and not any(isinstance(e, dict) and e.get("usage") for e in events)
    assert len(replicas.requests) == MAX_MIGRATIONS + 1 and replicas.migrations == MAX_MIGRATIONS
    assert [r.get("resume_token_ids") for r in replicas.requests] == [None, [0], [0, 1], [0, 1, 2]]
    assert all(s.cancelled for s in dying) and job.product.admission.inflight == 0

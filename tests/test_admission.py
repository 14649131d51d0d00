"""Admission on its own (no Ray): the per-product in-flight bound, the 429, and the one release of a request
however it ends, with its streams closed unless every sample finished."""

from __future__ import annotations

import asyncio

import pytest

from cluster.admission import Admission, Release, ReleasingStreamingResponse
from cluster.http_edge import APIError
from cluster.metric_names import INGRESS_INFLIGHT
from cluster.served_product import ServedProduct
from tests.cluster_helpers import tiny_products


class Stream:
    """A sample's stream as admission sees it: something to cancel."""

    def __init__(self) -> None:
        self.cancelled = 0

    def cancel(self) -> None:
        self.cancelled += 1


def test_samples_are_admitted_up_to_the_limit_and_a_request_is_admitted_whole() -> None:
    admission = Admission("support-chat", limit=4)
    admission.admit(3)
    with pytest.raises(APIError) as info:
        admission.admit(2)  # 5 > 4: refused whole, not one of its two samples
    error = info.value
    assert (error.status, error.type, error.code) == (429, "rate_limit_error", "queue_full")
    assert error.headers == {"Retry-After": "1"} and "support-chat" in error.message
    assert admission.inflight == 3
    admission.admit(1)
    assert admission.inflight == 4


def test_products_are_admitted_apart() -> None:
    chat, report = Admission("chat", limit=1), Admission("report", limit=1)
    chat.admit(1)
    report.admit(1)  # chat being full does not refuse report
    assert (chat.inflight, report.inflight) == (1, 1)


def test_a_finished_request_is_released_once_without_closing_its_streams() -> None:
    admission, streams = Admission("p", limit=8), [Stream(), Stream()]
    admission.admit(2)
    release = Release(admission, streams)
    asyncio.run(release(finished=True))
    asyncio.run(release(finished=False))  # the response's end, after the body's: a no-op
    assert admission.inflight == 0 and [s.cancelled for s in streams] == [0, 0]


def test_an_unfinished_request_closes_its_streams() -> None:
    admission, streams = Admission("p", limit=8), [Stream(), Stream(), object()]  # object(): nothing to cancel
    admission.admit(3)
    asyncio.run(Release(admission, streams)(finished=False))
    assert admission.inflight == 0 and [s.cancelled for s in streams[:2]] == [1, 1]


async def _send_all(response: ReleasingStreamingResponse) -> list[dict]:
    sent: list[dict] = []

    async def receive() -> dict:
        await asyncio.Event().wait()  # the client stays
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    await response({"type": "http", "asgi": {"spec_version": "2.4"}}, receive, send)
    return sent


@pytest.mark.parametrize("body_releases", [True, False])
def test_a_streamed_response_is_released_when_it_ends(body_releases: bool) -> None:
    """The SSE body releases itself when it finishes (finished=True: its streams are done); a body that did
    not is released by the response's end as unfinished, which closes its streams."""
    admission, stream = Admission("p", limit=8), Stream()
    admission.admit(1)
    release = Release(admission, [stream])

    async def body():
        yield "data: {}\n\n"
        if body_releases:
            await release(finished=True)

    sent = asyncio.run(_send_all(ReleasingStreamingResponse(body(), release)))
    assert sent[0]["status"] == 200 and dict(sent[0]["headers"])[b"content-type"].startswith(b"text/event-stream")
    assert b"".join(m.get("body", b"") for m in sent[1:]) == b"data: {}\n\n"
    assert admission.inflight == 0 and stream.cancelled == (0 if body_releases else 1)


def test_a_products_admission_is_bounded_by_its_queue_length_and_reported() -> None:
    config = tiny_products()["support-chat"]
    product = ServedProduct(config, tokenizer=None, max_model_len=256, vocab_size=8192, keys=frozenset(),
                            system_prefix=[])
    assert product.admission.limit == config.max_queue_len
    product.admission.admit(2)
    snapshot = product.snapshot(token_streams_open=1)
    assert snapshot.gauges[INGRESS_INFLIGHT] == 2.0

"""A client that goes away, at any point, leaves nothing behind on the ingress or the workers.

What must come back to zero: the product's in-flight count (else enough departed clients make it answer
429 forever), the ingress's token-stream queues, and every running request and KV block on the workers.
The narrowest window is a streamed response whose client is gone before its body is first iterated: the
body generator then never runs, so its own cleanup cannot be what releases the request.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from urllib.parse import urlsplit

import pytest
import ray
from starlette.requests import ClientDisconnect

from cluster.admission import Admission, Release, ReleasingStreamingResponse
from cluster.direct_stream import DirectStream
from cluster.invariants import wait_cluster_idle
from cluster.metric_names import INGRESS_INFLIGHT
from cluster.metrics_hub import get_hub
from decode_workers.token_stream_server import TokenStreamServer
from tests.test_http_api import REPORT_KEY

PRODUCT = "report-gen"  # long answers (up to 1,536 tokens): still decoding when the client leaves


async def _never_sent(message: dict) -> None:
    await asyncio.Event().wait()  # a client that stopped reading: the send never completes


async def _reset(message: dict) -> None:
    raise OSError("connection reset by peer")


async def _disconnected() -> dict:
    return {"type": "http.disconnect"}


@pytest.mark.parametrize("spec_version, send", [
    ("2.4", _reset),  # the server reports the disconnect as a failed send
    ("2.0", _never_sent),  # starlette listens for http.disconnect and cancels the body
])
def test_a_stream_whose_client_left_before_its_body_started_is_released(spec_version: str, send) -> None:
    async def run() -> tuple[bool, int, int, bool]:
        server = TokenStreamServer()  # open/close need no socket
        call = asyncio.get_running_loop().create_future()  # the decode worker's call: runs until cancelled
        stream = DirectStream(server, f"{PRODUCT}/gone", call)
        admission = Admission(PRODUCT, limit=4)
        admission.admit(1)
        started = False

        async def body():
            nonlocal started
            started = True
            yield "data: {}\n\n"

        response = ReleasingStreamingResponse(body(), Release(admission, [stream]))
        scope = {"type": "http", "asgi": {"spec_version": spec_version}}
        try:
            await asyncio.wait_for(response(scope, _disconnected, send), 30)
        except ClientDisconnect:
            pass
        await asyncio.sleep(0)  # the cancelled call settles
        return started, admission.inflight, server.num_open, call.cancelled()

    started, inflight, open_streams, call_cancelled = asyncio.run(run())
    assert not started  # the window under test: the body never ran
    assert inflight == 0 and open_streams == 0
    assert call_cancelled  # which aborts the request on its decode worker


def test_release_runs_once() -> None:
    async def run() -> int:
        admission = Admission(PRODUCT, limit=4)
        admission.admit(2)
        release = Release(admission, [object(), object()])  # streams without cancel(): nothing to close
        await release(finished=True)
        await release(finished=False)
        return admission.inflight

    assert asyncio.run(run()) == 0


def _ingress_inflight(product: str) -> float:
    sources = ray.get(get_hub().sources.remote(), timeout=60)
    return sum(s.gauges.get(INGRESS_INFLIGHT, 0.0) for s in sources if s.live and s.product == product)


def _post_and_leave(url: str, body: dict, read_bytes: int) -> None:
    """Send a request over a raw socket, read read_bytes of the answer, wait until the ingress reports the
    request in flight (so the check after it is not vacuous), then close the socket mid-request."""
    parts = urlsplit(url)
    payload = json.dumps(body).encode()
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: {parts.hostname}:{parts.port}\r\n"
            f"Authorization: Bearer {REPORT_KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n").encode()
    with socket.create_connection((parts.hostname, parts.port), timeout=120) as sock:
        sock.sendall(head + payload)
        received = b""
        while len(received) < read_bytes:
            chunk = sock.recv(4096)
            assert chunk, f"the server closed the connection first: {received!r}"
            received += chunk
        deadline = time.monotonic() + 30
        while _ingress_inflight(PRODUCT) == 0:  # the ingress reports about once a second
            assert time.monotonic() < deadline, "the request never showed as in flight"
            time.sleep(0.1)


def _assert_idle() -> None:
    problems = wait_cluster_idle(get_hub(), timeout_s=30, products=(PRODUCT,))
    assert not problems, problems


@pytest.mark.parametrize("stream, read_bytes", [
    (True, 0),  # streamed, never read
    (True, 400),  # streamed, gone after the first events
    (False, 0),  # not streamed, gone while its samples decode
])
def test_a_client_that_leaves_leaves_nothing_behind(pdserve_url: str, stream: bool, read_bytes: int) -> None:
    body = {"model": PRODUCT, "messages": [{"role": "user", "content": "a long answer nobody will read"}],
            "max_tokens": 1500, "ignore_eos": True, "stream": stream, "n": 2}
    _post_and_leave(pdserve_url, body, read_bytes)
    _assert_idle()  # in-flight counts, token-stream queues, running requests, KV blocks: all back to zero

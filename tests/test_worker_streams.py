"""Sample streams on their own (no Ray: a stand-in deployment handle): how a sample's request reaches its
decode deployment in each token-stream mode, how its open streams are counted and closed, and the bounded
wait for each next output. How failures map to HTTP errors: tests/test_failure_mapping.py."""

from __future__ import annotations

import asyncio

import pytest

import cluster.worker_streams as worker_streams
from cluster.direct_stream import DirectStream
from cluster.stream_migration import MigratingStream
from cluster.worker_streams import close, open_stream, open_streams_of, rest_outputs
from decode_workers.token_stream import TokenStreamError
from decode_workers.token_stream_server import TokenStreamServer

REQUEST = {"prompt_token_ids": [1, 2], "sampling_params": None, "cache_salt": "s"}


class Method:
    """A deployment method's `.remote`: records each request, answers with what it is given."""

    def __init__(self, answer) -> None:
        self.answer, self.requests = answer, []

    def remote(self, request: dict):
        self.requests.append(request)
        return self.answer


class Handle:
    def __init__(self, generate=None, generate_to=None) -> None:
        self.generate, self.generate_to, self.options_used = Method(generate), Method(generate_to), []

    def options(self, **options) -> Handle:
        self.options_used.append(options)
        return self


class Outputs:
    """A Serve streaming response's stand-in: these outputs, then a stall (stall=True) or the end."""

    def __init__(self, outputs: list[dict], stall: bool = False) -> None:
        self.outputs, self.stall = list(outputs), stall

    def __aiter__(self) -> Outputs:
        return self

    async def __anext__(self) -> dict:
        if self.outputs:
            return self.outputs.pop(0)
        if self.stall:
            await asyncio.Event().wait()
        raise StopAsyncIteration


def test_in_serve_mode_a_sample_is_a_serve_streaming_call() -> None:
    last = {"new_token_ids": [7], "finished": True}
    handle = Handle(generate=Outputs([last]))
    stream = open_stream(handle, REQUEST, "support-chat", None)
    assert isinstance(stream, MigratingStream)  # resumes elsewhere should its replica die

    async def read() -> list[dict]:
        return [out async for out in stream]

    assert asyncio.run(read()) == [last]
    assert handle.options_used == [{"stream": True}] and handle.generate.requests == [REQUEST]
    assert open_streams_of(None, "support-chat") == 0


def test_in_direct_mode_a_sample_gets_a_token_stream_of_its_product_until_closed() -> None:
    async def scenario() -> tuple[dict, int, int, int, bool]:
        server = TokenStreamServer()  # open/close need no socket
        call = asyncio.get_running_loop().create_future()  # the decode call: runs until cancelled
        handle = Handle(generate_to=call)
        stream = open_stream(handle, REQUEST, "support-chat", server)
        assert isinstance(stream, MigratingStream) and isinstance(stream._stream, DirectStream)
        sent = handle.generate_to.requests[0]
        opened = open_streams_of(server, "support-chat"), open_streams_of(server, "report-gen")
        await close(stream)
        await asyncio.sleep(0)
        return sent, *opened, open_streams_of(server, "support-chat"), call.cancelled()

    sent, mine, others, after, cancelled = asyncio.run(scenario())
    assert {k: v for k, v in sent.items() if k != "token_stream"} == REQUEST and "token_stream" not in REQUEST
    assert sent["token_stream"]["stream_id"].startswith("support-chat/")
    assert (mine, others, after) == (1, 0, 0)
    assert cancelled  # which aborts the request on its worker


def test_closing_a_stream_without_cancel_is_a_no_op() -> None:
    asyncio.run(close(Outputs([])))


def test_the_rest_of_a_stream_comes_in_order_until_its_end() -> None:
    async def rest(stream: Outputs) -> list[dict]:
        return [out async for out in rest_outputs(stream)]

    assert asyncio.run(rest(Outputs([{"i": 1}, {"i": 2}]))) == [{"i": 1}, {"i": 2}]


def test_a_stream_silent_past_the_limit_ends_with_a_token_stream_error(monkeypatch) -> None:
    monkeypatch.setattr(worker_streams, "NEXT_OUTPUT_TIMEOUT_S", 0.2)

    async def rest(stream: Outputs) -> list[dict]:
        return [out async for out in rest_outputs(stream)]

    with pytest.raises(TokenStreamError, match="no output from the worker within 0.2 s"):
        asyncio.run(rest(Outputs([{"i": 1}], stall=True)))

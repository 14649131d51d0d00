"""Direct token streams: one frame per loop turn, in order, refused and closed on bad input, and a
decode worker that loses its stream frees the request."""

from __future__ import annotations

import asyncio

import pytest

from cluster import direct_stream
from cluster.direct_stream import DirectStream
from decode_workers import token_stream as ts
from decode_workers.server import DecodeServer
from decode_workers.token_stream import TokenStreamError, TokenStreamSecurity, TokenStreamTarget
from decode_workers.token_stream_sender import TokenStreamSender
from decode_workers.token_stream_server import TokenStreamServer
from engine.config import SamplingParams
from tests.engine_helpers import random_prompts
from tests.tls_helpers import loopback_names, write_self_signed

HOST = "127.0.0.1"
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


def _out(tokens: list[int], finished: bool = False) -> dict:
    return {"new_token_ids": tokens, "finished": finished, "num_output_tokens": len(tokens)}


async def _server(security: TokenStreamSecurity | None = None) -> TokenStreamServer:
    server = TokenStreamServer(security)
    await server.start(HOST)
    return server


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TokenStreamSecurity:
    files = write_self_signed(tmp_path_factory.mktemp("ts-tls"), "pdserve-ingress", loopback_names())
    return TokenStreamSecurity(tls_cert_file=files.cert, tls_key_file=files.key, tls_ca_file=files.ca)


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory: pytest.TempPathFactory) -> str:
    return write_self_signed(tmp_path_factory.mktemp("ts-other"), "someone-else", loopback_names()).ca


async def _until(predicate, timeout_s: float = 5.0) -> None:
    for _ in range(int(timeout_s / 0.01)):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached")


def _drain(queue: asyncio.Queue) -> list[dict]:
    items = []
    while not queue.empty():
        items.append(queue.get_nowait())
    return items


# ---- the wire ----------------------------------------------------------------------------------
def test_one_loop_turn_of_outputs_travels_as_one_frame_in_order() -> None:
    async def run() -> None:
        server = await _server()
        a, b = server.open("a"), server.open("b")
        sender = TokenStreamSender()
        conn = await sender.connect(server.target("a"))
        assert await sender.connect(server.target("b")) is conn  # one connection per ingress
        for sid, tokens in (("a", [1]), ("b", [2]), ("a", [3])):
            await conn.send(sid, _out(tokens))
        await conn.flush()
        await _until(lambda: a.qsize() == 2 and b.qsize() == 1)
        assert server.frames_received == 1
        await conn.send("b", _out([4], finished=True))
        await conn.flush()
        await _until(lambda: b.qsize() == 2)
        assert server.frames_received == 2
        assert [o["new_token_ids"] for o in _drain(a)] == [[1], [3]]
        assert [(o["new_token_ids"], o["finished"]) for o in _drain(b)] == [([2], False), ([4], True)]
        sender.close()
        await server.stop()

    asyncio.run(run())


def test_wrong_secret_is_refused_and_delivers_nothing() -> None:
    async def run() -> None:
        server = await _server()
        queue = server.open("s")
        forged = TokenStreamTarget(server.host, server.port, "not-the-secret", "s")
        with pytest.raises(TokenStreamError, match="refused"):
            await TokenStreamSender().connect(forged)
        await asyncio.sleep(0.05)
        assert queue.empty() and server.frames_received == 0
        await server.stop()

    asyncio.run(run())


@pytest.mark.parametrize("frame", [
    pytest.param(b"\x00\x00\x00\x03\xc1\xc1\xc1", id="undecodable"),  # 0xc1 is no msgpack type
    pytest.param(ts.encode_frame({"s": [1]}), id="not-a-list-of-pairs"),
    pytest.param((ts.MAX_FRAME_BYTES + 1).to_bytes(4, "big"), id="oversized"),
])
def test_a_bad_frame_closes_its_connection_and_spares_the_others(frame: bytes) -> None:
    async def run() -> None:
        server = await _server()
        queue = server.open("s")
        reader, writer = await asyncio.open_connection(server.host, server.port)
        writer.write(ts.encode_frame(server.secret))
        assert await reader.read(1) == ts.ACK
        writer.write(frame + ts.encode_frame([["s", _out([9])]]))  # a good frame behind the bad one is not read
        assert await asyncio.wait_for(reader.read(1), 5) == b""  # the server closed the connection
        writer.close()
        assert queue.empty()
        conn = await TokenStreamSender().connect(server.target("s"))  # the server still serves others
        await conn.send("s", _out([1]))
        await conn.flush()
        await _until(lambda: queue.qsize() == 1)
        conn.close()
        await server.stop()

    asyncio.run(run())


def test_outputs_for_closed_or_unknown_streams_are_dropped() -> None:
    async def run() -> None:
        server = await _server()
        kept, gone = server.open("kept"), server.open("gone")
        server.close("gone")
        conn = await TokenStreamSender().connect(server.target("kept"))
        for sid in ("gone", "never-opened", "kept"):
            await conn.send(sid, _out([5]))
        await conn.flush()
        await _until(lambda: kept.qsize() == 1)
        assert gone.empty() and server.num_open == 1
        conn.close()
        await server.stop()

    asyncio.run(run())


def test_a_lost_connection_fails_the_next_send() -> None:
    async def run() -> None:
        server = await _server()
        server.open("s")
        sender = TokenStreamSender()
        conn = await sender.connect(server.target("s"))
        await server.stop()  # the ingress went away
        await _until(lambda: not conn.alive)
        with pytest.raises(TokenStreamError, match="closed by the ingress"):
            await conn.send("s", _out([1]))
        with pytest.raises(TokenStreamError, match="cannot connect"):  # and no new one can be opened
            await sender.connect(server.target("s"))

    asyncio.run(run())


@pytest.mark.parametrize("bad", [{}, {"host": HOST, "port": "x", "secret": "s", "stream_id": "i"},
                                 {"host": HOST, "port": 70000, "secret": "s", "stream_id": "i"}])
def test_a_malformed_target_is_a_value_error(bad: dict) -> None:
    with pytest.raises(ValueError, match="token_stream"):
        TokenStreamTarget.from_dict(bad)


# ---- who may listen where ----------------------------------------------------------------------
@pytest.mark.parametrize("host", ["10.1.2.3", "0.0.0.0", "ingress.internal"])
def test_plaintext_beyond_loopback_is_refused_unless_tls_or_allowed(host: str, tls: TokenStreamSecurity) -> None:
    assert not TokenStreamSecurity().permits(host)
    assert TokenStreamSecurity(allow_plaintext=True).permits(host) and tls.permits(host)
    assert all(TokenStreamSecurity().permits(h) for h in ("127.0.0.1", "::1", "localhost"))

    async def run() -> None:
        with pytest.raises(ValueError, match="plaintext"):
            await TokenStreamServer().start(host)

    asyncio.run(run())


@pytest.mark.parametrize("fields", [{"tls_cert_file": "c.pem"}, {"tls_server_name": "ingress"}])
def test_token_stream_tls_settings_are_validated(fields: dict) -> None:
    with pytest.raises(ValueError, match="token stream"):
        TokenStreamSecurity(**fields)


def test_outputs_travel_over_tls_and_a_plaintext_peer_gets_nothing(tls: TokenStreamSecurity, other_ca: str) -> None:
    async def run() -> None:
        server = await _server(tls)
        queue = server.open("s")
        target = server.target("s")
        assert target.tls_ca_file == tls.tls_ca_file
        assert TokenStreamTarget.from_dict(target.as_dict()) == target
        conn = await TokenStreamSender().connect(target)
        await conn.send("s", _out([1, 2]))
        await conn.flush()
        await _until(lambda: not queue.empty())
        assert _drain(queue) == [_out([1, 2])]

        plain = TokenStreamTarget(server.host, server.port, server.secret, "s")  # right secret, no TLS
        with pytest.raises(TokenStreamError):
            await TokenStreamSender().connect(plain)
        impostor_ca = TokenStreamTarget(server.host, server.port, server.secret, "s", tls_ca_file=other_ca)
        with pytest.raises(TokenStreamError):  # the worker does not send its outputs to a server it cannot verify
            await TokenStreamSender().connect(impostor_ca)
        assert queue.empty() and server.frames_received == 1
        await conn.send("s", _out([3], finished=True))  # the TLS connection outlived the refusals
        await conn.flush()
        await _until(lambda: not queue.empty())
        assert _drain(queue) == [_out([3], finished=True)]
        await server.stop()

    asyncio.run(run())


# ---- the ingress's reader ----------------------------------------------------------------------
class _Call:
    """Stands in for a Serve DeploymentResponse: awaitable and cancellable, ended by the test."""

    def __init__(self) -> None:
        self.future: asyncio.Future = asyncio.get_running_loop().create_future()
        self.cancelled = False

    def __await__(self):
        return self.future.__await__()

    def cancel(self) -> None:
        self.cancelled = True
        self.future.cancel()


def test_direct_stream_reads_outputs_then_ends_with_the_finished_one() -> None:
    async def run() -> None:
        server = await _server()
        call = _Call()
        stream = DirectStream(server, "s", call)
        conn = await TokenStreamSender().connect(server.target("s"))
        await conn.send("s", _out([1]))
        await conn.send("s", _out([2], finished=True))
        call.future.set_result({"num_output_tokens": 2})  # may overtake the outputs: they are still read
        assert [o["new_token_ids"] async for o in stream] == [[1], [2]]
        assert server.num_open == 0
        conn.close()
        await server.stop()

    asyncio.run(run())


@pytest.mark.parametrize("ending", ["call-failed", "last-output-lost"])
def test_direct_stream_raises_when_the_call_ends_without_its_outputs(monkeypatch, ending: str) -> None:
    """The call's own error (bad input, a dead replica) or, when it returned, a last output that never came."""
    monkeypatch.setattr(direct_stream, "FINAL_GRACE_S", 0.2)

    async def run() -> None:
        server = await _server()
        call = _Call()
        stream = DirectStream(server, "s", call)
        if ending == "call-failed":
            call.future.set_exception(ValueError("prompt too long"))
        else:
            call.future.set_result({})
        with pytest.raises(ValueError if ending == "call-failed" else TokenStreamError,
                           match="prompt too long" if ending == "call-failed" else "did not arrive"):
            await stream.__anext__()
        assert server.num_open == 0
        await server.stop()

    asyncio.run(run())


def test_direct_stream_cancel_cancels_the_call() -> None:
    async def run() -> None:
        server = await _server()
        call = _Call()
        stream = DirectStream(server, "s", call)
        stream.cancel()
        assert call.cancelled and server.num_open == 0
        await server.stop()

    asyncio.run(run())


# ---- a decode worker writing to it -------------------------------------------------------------
@pytest.fixture(scope="module")
def decoder():
    server = DecodeServer({"max_num_seqs": 8}, {"transport": "local"})
    yield server
    server.shutdown()


async def _assert_idle(decoder: DecodeServer) -> None:
    async def idle() -> bool:
        e = (await decoder.stats()).engine
        return e.num_blocks_free == e.num_blocks_total and e.num_requests_running == e.num_requests_waiting == 0

    for _ in range(200):
        if await idle():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"requests or blocks left behind: {(await decoder.stats()).engine}")


def _request(prompt: list[int], target: TokenStreamTarget, rid: str) -> dict:
    return {"request_id": rid, "prompt_token_ids": prompt, "sampling_params": GREEDY,
            "token_stream": target.as_dict()}


def test_generate_to_sends_the_same_tokens_as_generate_one_frame_per_step(decoder) -> None:
    prompts = random_prompts([30, 50, 70], 8192, seed=11)

    async def run() -> None:
        expected = []
        for i, prompt in enumerate(prompts):
            outs = [o async for o in decoder.generate({"request_id": f"ref{i}", "prompt_token_ids": prompt,
                                                       "sampling_params": GREEDY})]
            expected.append([t for o in outs for t in o["new_token_ids"]])
        server = await _server()
        queues = [server.open(f"s{i}") for i in range(len(prompts))]
        results = await asyncio.gather(*(decoder.generate_to(_request(p, server.target(f"s{i}"), f"r{i}"))
                                         for i, p in enumerate(prompts)))
        await _until(lambda: all(not q.empty() and q._queue[-1]["finished"] for q in queues))
        sent = [_drain(q) for q in queues]
        assert [[t for o in outs for t in o["new_token_ids"]] for outs in sent] == expected
        assert all(r == {"num_output_tokens": 12, "finish_reason": "length"} for r in results)
        # three requests decoding together: their outputs of a step share a frame
        assert server.frames_received < sum(len(outs) for outs in sent) * 2 // 3, server.frames_received
        await server.stop()
        await _assert_idle(decoder)

    asyncio.run(run())


@pytest.mark.parametrize("ending", ["ingress-gone", "call-cancelled"])
def test_generate_to_ended_early_aborts_the_request_and_frees_its_blocks(decoder, ending: str) -> None:
    """The ingress going away mid-request, or Serve cancelling the call (the client left)."""
    prompt = random_prompts([40], 8192, seed=12)[0]
    long = SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True)

    async def run() -> None:
        server = await _server()
        queue = server.open("s")
        request = {**_request(prompt, server.target("s"), ending), "sampling_params": long}
        task = asyncio.ensure_future(decoder.generate_to(request))
        await _until(lambda: not queue.empty())
        if ending == "ingress-gone":
            await server.stop()
            with pytest.raises(TokenStreamError):
                await task
        else:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await server.stop()
        await _assert_idle(decoder)

    asyncio.run(run())


def test_generate_to_a_refused_stream_starts_no_engine_work(decoder) -> None:
    prompt = random_prompts([40], 8192, seed=14)[0]

    async def run() -> None:
        server = await _server()
        forged = TokenStreamTarget(server.host, server.port, "wrong", "s")
        before = (await decoder.stats()).engine.prompt_tokens_computed
        with pytest.raises(TokenStreamError):
            await decoder.generate_to(_request(prompt, forged, "refused"))
        assert (await decoder.stats()).engine.prompt_tokens_computed == before
        await _assert_idle(decoder)
        await server.stop()

    asyncio.run(run())

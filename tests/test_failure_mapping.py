"""Failures become the right answer: a dead engine fails its health check (Serve replaces the replica);
a worker that is gone or full becomes 503 / 429 in OpenAI's error shape, a worker-side ValueError 400."""

from __future__ import annotations

import asyncio
import itertools
import pickle
import time

import pytest
from ray.exceptions import ActorDiedError
from ray.serve._private.common import DeploymentID
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

from cluster.http_edge import APIError
from cluster.worker_streams import first_output
from decode_workers.server import DecodeServer
from decode_workers.token_stream import TokenStreamError
from engine.async_engine import EngineDeadError
from engine.config import SamplingParams
from engine.scheduler import OverloadedError


def test_health_check_reflects_engine_liveness() -> None:
    async def scenario() -> None:
        server = DecodeServer(None, {"transport": "local"}, None)
        try:
            await server.check_health()

            def broken_step():
                raise RuntimeError("device lost")

            server.engine.engine.step = broken_step
            request = {"prompt_token_ids": [5, 6, 7], "sampling_params": SamplingParams(max_tokens=3)}
            with pytest.raises(EngineDeadError):
                async for _ in server.generate(request):
                    pass
            with pytest.raises(RuntimeError, match="engine loop is dead"):
                await server.check_health()
        finally:
            server.shutdown()

    asyncio.run(scenario())


async def _failing(exc: BaseException):
    raise exc
    yield  # an async generator that fails on its first item


@pytest.mark.parametrize("exc, status, code", [
    (DeploymentUnavailableError(DeploymentID(name="support-chat-decode", app_name="pdserve")), 503, "unavailable"),
    (ActorDiedError(), 503, "unavailable"),
    (BackPressureError(num_queued_requests=10, max_queued_requests=10), 429, "queue_full"),
    (ValueError("prompt_token_ids contains 99999, outside the vocabulary"), 400, None),
    (TokenStreamError("the worker finished but its last output did not arrive"), 503, "worker_failed"),
])
def test_worker_failures_map_to_http_errors(exc: BaseException, status: int, code: str | None) -> None:
    with pytest.raises(APIError) as info:
        asyncio.run(first_output(_failing(exc)))
    assert info.value.status == status and info.value.code == code
    if status == 429:
        assert info.value.headers == {"Retry-After": "1"}


def test_an_overloaded_engine_is_a_429_with_the_expected_wait_as_retry_after() -> None:
    refusal = OverloadedError("predicted time to first token 7.20 s is past this request's limit of 2.00 s", 5.2)
    copy = pickle.loads(pickle.dumps(refusal))  # as Ray carries it
    assert (copy.reason, copy.retry_after_s) == (refusal.reason, 5.2)
    with pytest.raises(APIError) as info:
        asyncio.run(first_output(_failing(refusal)))
    assert (info.value.status, info.value.code, info.value.type) == (429, "slo_overloaded", "rate_limit_error")
    assert info.value.headers == {"Retry-After": "6"} and "7.20 s" in info.value.message


@pytest.mark.parametrize("limit, refusal", [("reject_past_s", "time to first token"),
                                            ("decode_seat_share", "requests would decode")])
def test_a_decode_worker_refuses_a_request_past_its_limit_names_itself_and_keeps_nothing(limit: str,
                                                                                          refusal: str) -> None:
    """A share of seats is absurdly small, checked from the first request (the engine's max_num_seqs bound
    them). The predicted TTFT is checked once the engine has timed a step, so the first request passes; a
    request is then refused for the load ahead of it (never for its own length): a short prompt sent while a
    long one is computed in 16-token steps, with a limit far above the short prompt's own time."""
    async def scenario() -> None:
        server = DecodeServer({"max_num_batched_tokens": 16}, {"transport": "local"}, None)
        try:
            request = {"prompt_token_ids": list(range(5, 45)), "sampling_params": SamplingParams(max_tokens=2),
                       "slo": {"ttft_s": 1.0, "itl_s": 0.2}, limit: 1e-6 if limit == "decode_seat_share" else 0.1}
            if limit == "reject_past_s":
                assert len([o async for o in server.generate(request)]) >= 1  # nothing timed yet: no limit
                info = await _refusal_behind_a_long_prompt(server, request)
            else:
                with pytest.raises(OverloadedError) as caught:
                    async for _ in server.generate(request):
                        pass
                info = caught.value
            assert refusal in str(info)
            assert info.worker_id == server.worker_id  # the ingress may try another replica
            engine = (await server.stats()).engine
            assert engine.num_blocks_free == engine.num_blocks_total and engine.num_requests_waiting == 0
            assert len([o async for o in server.generate({**request, limit: None})]) >= 1
        finally:
            server.shutdown()

    asyncio.run(scenario())


async def _refusal_behind_a_long_prompt(server: DecodeServer, request: dict) -> OverloadedError:
    """The first refusal of `request` sent while a long prompt (3,900 tokens, a new one each round: none is
    in the prefix cache) is computed; returns once that prompt has been served."""
    deadline = time.monotonic() + 120
    for round_ in itertools.count():
        long = {"prompt_token_ids": [6 + round_] + [5 + i % 200 for i in range(3900)],
                "sampling_params": SamplingParams(max_tokens=1)}
        served = asyncio.create_task(_outputs(server.generate(long)))
        refused = None
        while refused is None and not served.done():
            assert time.monotonic() < deadline, "no request was refused"
            try:
                await _outputs(server.generate(request))
            except OverloadedError as exc:
                refused = exc
        assert len(await served) >= 1
        if refused is not None:
            return refused
    raise AssertionError("unreachable")


async def _outputs(stream) -> list:
    return [o async for o in stream]


def test_a_worker_that_stops_sending_ends_the_request() -> None:
    """A decode call that stays open but sends nothing (a wedged worker): the wait for its next output
    gives up after the limit with a TokenStreamError (503 at the ingress), and the call is cancelled, which
    aborts the request on the worker and closes its token-stream queue."""
    from cluster.direct_stream import DirectStream
    from cluster.worker_streams import next_output
    from decode_workers.token_stream_server import TokenStreamServer

    async def scenario() -> tuple[bool, int]:
        server = TokenStreamServer()
        call = asyncio.get_running_loop().create_future()  # never answers
        stream = DirectStream(server, "support-chat/silent", call)
        with pytest.raises(TokenStreamError, match="no output from the worker within 0.2 s"):
            await next_output(stream, 0.2)
        await asyncio.sleep(0)
        return call.cancelled(), server.num_open

    assert asyncio.run(scenario()) == (True, 0)


def test_a_stalled_first_output_maps_to_503(monkeypatch) -> None:
    import cluster.worker_streams as worker_streams

    async def silent():
        await asyncio.Event().wait()
        yield {}

    monkeypatch.setattr(worker_streams, "FIRST_OUTPUT_TIMEOUT_S", 0.2)
    with pytest.raises(APIError) as info:
        asyncio.run(first_output(silent()))
    assert info.value.status == 503 and info.value.code == "worker_failed"

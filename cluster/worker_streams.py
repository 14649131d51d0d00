"""One sample's outputs from its decode worker: opening the stream, bounded waits, failures as HTTP errors.

A stream async-iterates StepOutput dicts: the items of a Serve streaming call ("serve" mode) or a
DirectStream fed by this replica's token-stream server ("direct" mode, stream ids `<product>/<hex>`).
Every wait for an output is bounded, so a worker that stops sending without failing (wedged; its health
check then gets it replaced) ends the request instead of holding it forever. A replica that dies is not a
failure: the sample resumes on another (cluster/stream_migration.py). Failures become APIErrors:
400 the worker refused the input, 429 workers full (Retry-After), 500 the request's own work failed on a
healthy engine, 503 a worker gone, failed or silent.
"""

from __future__ import annotations

import asyncio
import math
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

from cluster.direct_stream import DirectStream
from cluster.http_edge import APIError, describe
from cluster.stream_migration import MigratingStream
from decode_workers.token_stream import TokenStreamError
from decode_workers.token_stream_server import TokenStreamServer
from engine.async_engine import RequestFailedError
from engine.scheduler import OverloadedError

if TYPE_CHECKING:  # served_product imports admission, which imports this module
    from cluster.served_product import ProductStats

# Waits on a worker, in seconds: for a sample's first output (queueing and prefill included), and for each
# next output.
FIRST_OUTPUT_TIMEOUT_S = 300.0
NEXT_OUTPUT_TIMEOUT_S = 300.0


def open_stream(handle: Any, request: dict, product: str, server: TokenStreamServer | None,
                stats: ProductStats | None = None) -> AsyncIterator[dict]:
    """Start request (a decode worker's request dict) on the product's DecodeServer handle; its outputs over
    server's token stream, or as a Serve streaming call when server is None. When the replica serving it dies,
    the request resumes on another, and when a replica's engine refuses it for load, another replica is tried
    (cluster/stream_migration.py; each counted in stats)."""
    return MigratingStream(lambda req: _open_on_replica(handle, req, product, server), request,
                           stats.count_migration if stats else None, on_spill=stats.count_spill if stats else None)


def _open_on_replica(handle: Any, request: dict, product: str, server: TokenStreamServer | None) -> AsyncIterator[dict]:
    if server is None:
        return handle.options(stream=True).generate.remote(request).__aiter__()
    stream_id = f"{product}/{uuid.uuid4().hex}"  # per product: counted by open_streams_of
    target = server.target(stream_id).as_dict()
    return DirectStream(server, stream_id, handle.generate_to.remote({**request, "token_stream": target}))


def open_streams_of(server: TokenStreamServer | None, product: str) -> int:
    """How many of product's token streams are open on server (0 without one)."""
    return 0 if server is None else server.num_open_for(f"{product}/")


async def next_output(stream: AsyncIterator[dict], timeout_s: float) -> dict:
    """The stream's next output; TokenStreamError when none comes within timeout_s (the wait is cancelled,
    which cancels a DirectStream's call and so aborts the request on its worker)."""
    try:
        async with asyncio.timeout(timeout_s):  # no task per output, as wait_for would make: this is per token
            return await stream.__anext__()
    except TimeoutError as exc:
        raise TokenStreamError(f"no output from the worker within {timeout_s:g} s") from exc


async def rest_outputs(stream: AsyncIterator[dict]) -> AsyncIterator[dict]:
    """The stream's outputs after the first, each within NEXT_OUTPUT_TIMEOUT_S of the one before."""
    while True:
        try:
            out = await next_output(stream, NEXT_OUTPUT_TIMEOUT_S)
        except StopAsyncIteration:
            return
        yield out


async def first_output(stream: AsyncIterator[dict]) -> dict:
    """The stream's first output, within FIRST_OUTPUT_TIMEOUT_S; any failure as the APIError to answer."""
    try:
        return await next_output(stream, FIRST_OUTPUT_TIMEOUT_S)
    except StopAsyncIteration as exc:
        raise APIError(503, "the worker ended the request without output", "server_error") from exc
    except (RayTaskError, ValueError, TokenStreamError, OverloadedError) as exc:  # TokenStreamError: no outputs
        cause = getattr(exc, "cause", None) or exc
        if isinstance(cause, ValueError):
            raise APIError(400, str(cause)) from exc
        if isinstance(cause, OverloadedError):
            raise overloaded(cause) from exc
        raise worker_failure(exc, "") from exc
    except (RayActorError, DeploymentUnavailableError) as exc:
        raise APIError(503, f"no healthy replica: {describe(exc)}", "server_error", "unavailable") from exc
    except BackPressureError as exc:
        raise APIError(429, "workers are at capacity; retry shortly", "rate_limit_error", "queue_full",
                       headers={"Retry-After": "1"}) from exc


def overloaded(exc: OverloadedError) -> APIError:
    """429 for a request its engine refused at once for load (OverloadedError: its predicted time to first token
    is past its product's limit, or its product's share of decode seats is full); Retry-After is when the
    engine expects room, in whole seconds."""
    retry_after = max(1, math.ceil(exc.retry_after_s))
    return APIError(429, f"{exc}; retry in about {retry_after} s", "rate_limit_error", "slo_overloaded",
                    headers={"Retry-After": str(retry_after)})


def worker_failure(exc: BaseException, where: str) -> APIError:
    """500 when the request's own work failed on a healthy engine (it would fail again anywhere); 503 when a
    worker failed (dead, unreachable: another replica may serve a retry)."""
    if isinstance(getattr(exc, "cause", None) or exc, RequestFailedError):
        return APIError(500, f"the request failed{where}: {describe(exc)}", "server_error", "request_failed")
    return APIError(503, f"worker failed{where}: {describe(exc)}", "server_error", "worker_failed")


async def close(stream: AsyncIterator[dict]) -> None:
    """Stop a stream that will not be read to its end: its cancel() (a DirectStream's, a Serve response's)
    aborts the request on its worker, and a DirectStream drops its token-stream queue. A stream without
    cancel() is left as it is."""
    cancel = getattr(stream, "cancel", None)
    if cancel is not None:
        cancel()

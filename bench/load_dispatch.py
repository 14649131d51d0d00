"""Send a request stream at its arrival process, bounded in time and count; collect one record per request sent.

Open loop (Poisson): request i is sent at its arrival_s, whether or not earlier ones finished, so a
slow server sees the same offered load as a fast one. Closed loop (Concurrency): at most N requests
in flight; the next is sent as one finishes.

Bounds: no request is sent after `duration_s` or beyond `max_requests`; requests still running
then get `drain_s` more seconds to finish and are cancelled after that (recorded as CANCELLED), so a
run lasts at most duration_s + drain_s. Every request sent gets exactly one record.

429s: recorded with their Retry-After and never retried. A retry would send a request the
arrival process did not, so the offered load would depend on the server under test; what the
server refused is what the benchmark reports.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

from bench.load_stats import CANCELLED, CLIENT_ERROR, RequestRecord
from bench.workload import Arrival, ChatRequest, Concurrency

# send(request, t0): sends it now and returns its record; t0 is the run's start (time.perf_counter()).
Send = Callable[[ChatRequest, float], Awaitable[RequestRecord]]


@dataclass(frozen=True)
class Limits:
    """A run's bounds: seconds of sending, requests at most (None: no limit), seconds to let the last ones finish."""

    duration_s: float
    max_requests: int | None = None
    drain_s: float = 60.0

    def __post_init__(self) -> None:
        if self.duration_s <= 0 or self.drain_s < 0:
            raise ValueError(f"need duration_s > 0 and drain_s >= 0, got {self.duration_s}, {self.drain_s}")
        if self.max_requests is not None and self.max_requests < 1:
            raise ValueError(f"max_requests must be >= 1, got {self.max_requests}")


@dataclass(frozen=True)
class LoadResult:
    records: tuple[RequestRecord, ...]  # in the order they were sent
    wall_s: float  # first send to the last record, seconds


async def run_load(requests: Iterable[ChatRequest], arrival: Arrival, limits: Limits, send: Send,
                   on_record: Callable[[RequestRecord], None] | None = None) -> LoadResult:
    """Send `requests` paced by `arrival` within `limits`; on_record sees each record as it completes."""
    t0 = time.perf_counter()
    slots = asyncio.Semaphore(arrival.concurrency) if isinstance(arrival, Concurrency) else None
    sent: list[tuple[asyncio.Task[RequestRecord], ChatRequest, float]] = []
    for request in requests:
        if limits.max_requests is not None and len(sent) >= limits.max_requests:
            break
        if not await _wait_turn(request, slots, t0, limits.duration_s):
            break
        task = asyncio.create_task(_guarded(send, request, t0))
        if slots is not None:
            task.add_done_callback(lambda _: slots.release())
        if on_record is not None:
            task.add_done_callback(lambda t: t.cancelled() or on_record(t.result()))
        sent.append((task, request, time.perf_counter() - t0))
    tasks = [task for task, _, _ in sent]
    if tasks:
        await asyncio.wait(tasks, timeout=limits.drain_s)
    records = [_record_of(task, request, sent_s, on_record) for task, request, sent_s in sent]
    await asyncio.gather(*tasks, return_exceptions=True)  # let cancelled streams close before the loop ends
    return LoadResult(records=tuple(records), wall_s=max(time.perf_counter() - t0, 1e-9))


async def _wait_turn(request: ChatRequest, slots: asyncio.Semaphore | None, t0: float, duration_s: float) -> bool:
    """Wait until `request` may be sent; False when the run's sending time is over first."""
    remaining = duration_s - (time.perf_counter() - t0)
    if slots is not None:
        try:
            await asyncio.wait_for(slots.acquire(), timeout=max(remaining, 0.0))
        except TimeoutError:
            return False
        return time.perf_counter() - t0 < duration_s or _give_back(slots)
    if request.arrival_s is None:
        raise ValueError("open-loop arrivals need requests with arrival_s (generate them with a Poisson arrival)")
    if request.arrival_s >= duration_s:
        return False
    await asyncio.sleep(max(0.0, request.arrival_s - (time.perf_counter() - t0)))
    return True


async def _guarded(send: Send, request: ChatRequest, t0: float) -> RequestRecord:
    """send(), with a bug in it recorded as an error rather than losing the request's record."""
    sent_s = time.perf_counter() - t0
    try:
        return await send(request, t0)
    except Exception as exc:  # noqa: BLE001 - any failure of one request must not end the run
        return RequestRecord(request_id=request.request_id, product=request.product, sent_s=sent_s,
                             outcome=CLIENT_ERROR, error=f"{type(exc).__name__}: {exc}"[:300])


def _give_back(slots: asyncio.Semaphore) -> bool:
    slots.release()
    return False


def _record_of(task: asyncio.Task[RequestRecord], request: ChatRequest, sent_s: float,
               on_record: Callable[[RequestRecord], None] | None) -> RequestRecord:
    if task.done() and not task.cancelled():
        return task.result()
    task.cancel()  # its stream is closed when the task unwinds
    record = RequestRecord(request_id=request.request_id, product=request.product, sent_s=sent_s, outcome=CANCELLED,
                           error="still running when the drain time ran out")
    if on_record is not None:
        on_record(record)
    return record

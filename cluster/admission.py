"""Admission: how many samples a product has in flight on this replica, and the one release of each request.

Invariants: a product's in-flight count is the samples admitted and not yet released; it is admitted up
to this replica's share of the product's bound (cluster/admission_split.py), which may change while
samples are in flight and then applies to new admissions only; a request is
admitted whole (its n samples) or refused with 429 and Retry-After, and released exactly once however it
ends (finished, failed, or its client gone at any point), so departed clients cannot leave the count up
and the product answering 429 forever.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from cluster.http_edge import APIError
from cluster.worker_streams import close


class Admission:
    """One product's in-flight samples on this replica. bound: the product's max_queue_len, for the whole
    ingress deployment; limit: this replica's share of it (the whole bound until split)."""

    def __init__(self, product: str, limit: int) -> None:
        self.product, self.bound, self.limit, self.inflight = product, limit, limit, 0

    def admit(self, samples: int) -> None:
        """Count samples in flight, or refuse them all with 429 when they would pass the limit."""
        if self.inflight + samples > self.limit:
            raise APIError(429, f"Too many requests in flight for `{self.product}`; retry shortly.",
                           "rate_limit_error", "queue_full", headers={"Retry-After": "1"})
        self.inflight += samples


class Release:
    """Ends an admitted request's hold exactly once: its samples leave the in-flight count and, unless every
    sample finished, its streams are closed (which aborts their requests on the workers and drops their
    token-stream queues). A streamed response calls it from the body's end and from the response's end: a
    client that disconnects before the body is first iterated leaves a body generator that never runs, and
    nothing else would."""

    def __init__(self, admission: Admission, streams: list) -> None:
        """streams: one per admitted sample."""
        self._admission, self._streams, self._done = admission, streams, False

    async def __call__(self, finished: bool) -> None:
        if self._done:
            return
        self._done = True
        self._admission.inflight -= len(self._streams)
        if not finished:
            await asyncio.gather(*(close(s) for s in self._streams), return_exceptions=True)


class ReleasingStreamingResponse(StreamingResponse):
    """An SSE response whose release runs when the ASGI call ends, however it ends (a body never iterated,
    a send to a gone client, a cancellation)."""

    def __init__(self, content: AsyncIterator[str], release: Release) -> None:
        super().__init__(content, media_type="text/event-stream")
        self._release = release

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._release(finished=False)  # a no-op when the body ended and released first

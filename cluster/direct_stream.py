"""One request's outputs as the ingress reads them over a direct token stream.

A DirectStream async-iterates output dicts, like a Serve streaming response, from two sources:
the token stream's queue (every output, in order) and the Serve call that runs the request on a
decode worker (its end). The call failing (bad input, a dead replica, a lost token stream) raises
its error from the iterator, the same exception types a Serve stream raises. The call returning
means its last output was written first, so the iterator waits for that output (at most
FINAL_GRACE_S) and ends with it. `cancel()` cancels the call, which aborts the request on its
worker, and stops receiving.
"""

from __future__ import annotations

import asyncio
from typing import Any

from decode_workers.token_stream import TokenStreamError
from decode_workers.token_stream_server import TokenStreamServer
from prefill_workers.remote_calls import awaited

FINAL_GRACE_S = 10.0  # the call returned; its last output, written before, is this late at most
_CALL_ENDED = object()


class DirectStream:
    def __init__(self, server: TokenStreamServer, stream_id: str, response: Any) -> None:
        """response: the awaitable, cancellable Serve call (DeploymentResponse) that writes to stream_id."""
        self._server, self._stream_id, self._response = server, stream_id, response
        self._queue = server.open(stream_id)
        self._call = asyncio.ensure_future(awaited(response))
        self._call.add_done_callback(self._call_ended)
        self._call_returned = False
        self._finished = False

    def __aiter__(self) -> DirectStream:
        return self

    async def __anext__(self) -> dict:
        if self._finished:
            raise StopAsyncIteration
        try:
            out = await self._next_output()
        except BaseException:
            self.cancel()
            raise
        if out["finished"]:
            self._finished = True
            self._server.close(self._stream_id)
        return out

    def cancel(self) -> None:
        self._server.close(self._stream_id)
        if not self._call.done():
            self._response.cancel()
            self._call.cancel()

    async def _next_output(self) -> dict:
        while True:
            if self._call_returned:
                try:
                    item = await asyncio.wait_for(self._queue.get(), FINAL_GRACE_S)
                except TimeoutError as exc:
                    raise TokenStreamError(f"the worker finished stream {self._stream_id} but its last "
                                           f"output did not arrive within {FINAL_GRACE_S} s") from exc
            else:
                item = await self._queue.get()
            if item is not _CALL_ENDED:
                return item
            if self._call.cancelled():
                raise TokenStreamError(f"stream {self._stream_id} was cancelled")
            error = self._call.exception()
            if error is not None:
                raise error
            self._call_returned = True

    def _call_ended(self, call: asyncio.Future) -> None:
        if not call.cancelled():
            call.exception()  # retrieved here: a call that fails after the last output is not an error to log
        self._queue.put_nowait(_CALL_ENDED)

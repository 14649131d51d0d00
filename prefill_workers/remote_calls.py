"""Calls to other actors and Serve deployments, as a caller waits on them and gives up on them.

A Ray ObjectRef and a Serve DeploymentResponse are both awaitable and cancellable, in different ways.
Here, because the decode workers and the cluster both call workers (imports point cluster -> workers),
and this module imports neither torch nor the engine (the metrics hub imports it).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

import ray

log = logging.getLogger(__name__)

T = TypeVar("T")


async def awaited(call: Awaitable[T]) -> T:
    """The result of a call as a coroutine: ObjectRefs and DeploymentResponses are awaitable but not
    coroutines, and asyncio.wait_for or ensure_future want one."""
    return await call


def call_streaming(handle: Any, method: str, *args: Any) -> Any:
    """Start a call of a generator method: on a Ray actor handle an ObjectRefGenerator, on a Serve
    DeploymentHandle a DeploymentResponseGenerator. Read it with `stream_items`, stop it with `cancel`."""
    if isinstance(handle, ray.actor.ActorHandle):
        return getattr(handle, method).options(num_returns="streaming").remote(*args)
    return getattr(handle.options(stream=True), method).remote(*args)


async def stream_items(call: Any) -> AsyncIterator[Any]:
    """The items a call_streaming call yields, in order (Ray's ObjectRefs awaited; Serve's come as they are)."""
    async for item in call:
        yield await item if isinstance(item, ray.ObjectRef) else item


def cancel(call: Any) -> None:
    """Cancel an ObjectRef, an ObjectRefGenerator or a DeploymentResponse (or its generator); one that already
    finished, or whose worker is gone, is left as it is."""
    try:
        if isinstance(call, ray.ObjectRef | ray.ObjectRefGenerator):
            ray.cancel(call)
        else:
            call.cancel()
    except Exception as exc:  # already finished or the worker is gone
        log.debug("cancel failed: %r", exc)

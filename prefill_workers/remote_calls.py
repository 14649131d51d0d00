"""Calls to other actors and Serve deployments, as a caller waits on them and gives up on them.

A Ray ObjectRef and a Serve DeploymentResponse are both awaitable and cancellable, in different ways.
Here, because the decode workers and the cluster both call workers (imports point cluster -> workers),
and this module imports neither torch nor the engine (the metrics hub imports it).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable
from typing import Any, TypeVar

import ray

log = logging.getLogger(__name__)

T = TypeVar("T")


async def awaited(call: Awaitable[T]) -> T:
    """The result of a call as a coroutine: ObjectRefs and DeploymentResponses are awaitable but not
    coroutines, and asyncio.wait_for or ensure_future want one."""
    return await call


def cancel(call: Any) -> None:
    """Cancel an ObjectRef or a DeploymentResponse; one that already finished, or whose worker is gone, is
    left as it is."""
    try:
        if isinstance(call, ray.ObjectRef):
            ray.cancel(call)
        else:
            call.cancel()
    except Exception as exc:  # already finished or the worker is gone
        log.debug("cancel failed: %r", exc)

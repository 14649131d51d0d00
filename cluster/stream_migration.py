"""A sample's stream that outlives its decode replica: when the replica dies, the sample resumes on another.

The ingress knows every token a sample's stream delivered. When the stream fails because the replica serving
it died (replica_died), the sample is sent again to the decode deployment, whose router picks a live replica,
as a resume: the same prompt and sampling params plus `resume_token_ids`, the tokens delivered so far. That
replica computes them as context (the dead one's KV is gone) and its outputs start at the next new token, with
num_output_tokens and the final text covering the whole output; greedy and seeded runs continue token for
token (engine.sampler.replay_draws). So the detokenizer, stop strings, logprobs and usage downstream go on as
if nothing happened: the client sees a pause, no error.

A sample a decode replica's engine refused for load before any output (OverloadedError naming that worker)
is tried on another replica: one engine being full is not the pool being full. The request goes again with
`avoid_workers`, the replicas that refused it, which the decode router ranks last (cluster/routing.py).

Invariants:
- only a replica's death migrates; a request-level failure (bad input, the request's own work failing on a
  healthy engine, a silent worker's timeout) is raised as it was;
- a refusal for load spills to another replica at most max_spills times, only before any output and only
  when a decode replica's own engine refused (a prefill worker's refusal is raised as it was); the last
  refusal is raised (429 with Retry-After);
- a sample migrates at most max_migrations times; the death after that is raised (the client gets the clean
  error), so a request that kills every replica it lands on cannot hop forever;
- no token is repeated or lost: the outputs delivered before the death are kept, and the resume asks for
  exactly what follows them.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable

from ray.exceptions import RayActorError, RayTaskError

from engine.async_engine import EngineDeadError
from engine.scheduler import OverloadedError

log = logging.getLogger(__name__)

MAX_MIGRATIONS = 3  # per sample
MAX_SPILLS = 2  # per sample: tries on other replicas after an engine refused it for load


def replica_died(exc: BaseException) -> bool:
    """True when exc says the decode replica serving a stream is gone: its actor died or cannot be reached
    (RayActorError, raised by a Serve stream or by a direct stream's call), or its engine loop died
    (EngineDeadError inside the call's RayTaskError: Serve replaces that replica)."""
    if isinstance(exc, RayActorError):
        return True
    return isinstance(exc, RayTaskError) and isinstance(getattr(exc, "cause", None), EngineDeadError)


def resume_request(request: dict, delivered: list[int]) -> dict:
    """The decode worker's request that continues `request` after the token ids already delivered. It is
    not refused for load (reject_past_s, decode_seat_share): the sample was admitted and its client is waiting."""
    return {**request, "resume_token_ids": list(delivered), "reject_past_s": None, "decode_seat_share": None}


class MigratingStream:
    """Async-iterates one sample's StepOutput dicts across replicas; cancel() stops the current stream."""

    def __init__(self, open_on_replica: Callable[[dict], AsyncIterator[dict]], request: dict,
                 on_migration: Callable[[], None] | None = None, max_migrations: int = MAX_MIGRATIONS,
                 max_spills: int = MAX_SPILLS, on_spill: Callable[[], None] | None = None) -> None:
        """open_on_replica(request): the outputs of request run on a replica the deployment picks.
        on_migration, on_spill: called once per migration, per spill (for the metrics)."""
        self._open, self._request = open_on_replica, request
        self._on_migration, self._max_migrations = on_migration, max_migrations
        self._on_spill, self._max_spills = on_spill, max_spills
        self._stream = open_on_replica(request)
        self._delivered: list[int] = []  # every token id returned so far, in order
        self.migrations = self.spills = 0

    def __aiter__(self) -> MigratingStream:
        return self

    async def __anext__(self) -> dict:
        while True:
            try:
                out = await self._stream.__anext__()
            except StopAsyncIteration:
                raise
            except Exception as exc:
                refused_by = self._refused_by(exc)
                if refused_by is not None:
                    self._spill(refused_by)
                    continue
                if not replica_died(exc) or self.migrations >= self._max_migrations:
                    raise
                self._migrate(exc)
                continue
            self._delivered.extend(out["new_token_ids"])
            return out

    def cancel(self) -> None:
        cancel = getattr(self._stream, "cancel", None)
        if cancel is not None:
            cancel()

    def _refused_by(self, exc: BaseException) -> str | None:
        """The decode worker whose engine refused this sample for load, when another may still take it."""
        cause = getattr(exc, "cause", None) or exc
        if not isinstance(cause, OverloadedError) or self._delivered or self.spills >= self._max_spills:
            return None
        return cause.worker_id

    def _spill(self, refused_by: str) -> None:
        self.cancel()
        self.spills += 1
        avoid = [*self._request.get("avoid_workers", ()), refused_by]
        self._request = {**self._request, "avoid_workers": avoid}
        self._stream = self._open(self._request)
        if self._on_spill is not None:
            self._on_spill()

    def _migrate(self, exc: BaseException) -> None:
        self.cancel()  # a direct stream drops its token-stream queue; the dead call has nothing left to abort
        self.migrations += 1
        log.warning("decode replica died mid-stream (%r): resuming after %d tokens, migration %d of at most %d",
                    exc, len(self._delivered), self.migrations, self._max_migrations)
        self._stream = self._open(resume_request(self._request, self._delivered))
        if self._on_migration is not None:
            self._on_migration()

"""A product's admission bound split across the ingress replicas, and re-split as their number changes.

A product's max_queue_len B bounds its samples in flight on the whole ingress deployment, whatever its
replica count W. Replica `rank` (0 <= rank < W) admits up to

    share(B, W, rank) = B // W + (1 if rank < B % W else 0)  ( = ceil((B - rank) / W) )

so the shares of ranks 0..W-1 sum to exactly B, and no request waits on another replica: the bound costs
no call per request. Invariants:
- the shares of one membership sum to B; a share only shrinks as W grows with the rank kept (Serve keeps
  a replica's rank while others come and go), so a re-split never raises the total over B;
- a replica whose rank is B or more (more replicas than the bound) gets 0 and answers 429 at once;
- a new, smaller share applies to new admissions at once; samples already in flight stay until they end
  (Admission refuses while in flight + new > share).
Between a membership change and a replica's next refresh (at most its period: 1 s, longer with many
replicas, see AdmissionSplit.period) replicas may split over
different W; the total can then pass B by at most one new replica's share (see ARCHITECTURE.md).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from cluster.admission import Admission

log = logging.getLogger(__name__)

# Membership reads per second by the whole ingress deployment, at most: each one is a status call to Serve's
# controller, the one actor every replica of the cluster already reports to.
MAX_READS_PER_S = 8.0


def share(bound: int, replicas: int, rank: int) -> int:
    """Samples replica `rank` of `replicas` may hold in flight so that all of them hold at most `bound`."""
    if replicas < 1 or not 0 <= rank < replicas:
        raise ValueError(f"rank {rank} is not one of {replicas} replicas")
    return bound // replicas + (1 if rank < bound % replicas else 0)


@dataclass(frozen=True)
class Membership:
    """Where this replica stands in the ingress deployment: its rank and how many replicas share the bound.
    A rank past the count (Serve has not compacted ranks yet) counts as one more replica: never a share
    from a count that leaves this rank out."""

    rank: int
    replicas: int

    @property
    def effective_replicas(self) -> int:
        return max(self.replicas, self.rank + 1, 1)


# One ingress replica on its own (a test, or outside Serve): the whole bound.
ALONE = Membership(rank=0, replicas=1)


class AdmissionSplit:
    """Keeps each admission's limit at this replica's share of its product's bound (admission.bound).

    read() gives the current Membership (blocking: it may call the Serve controller), run in a thread every
    period_s from an asyncio task, off the request path. A failed read keeps the last split (logged once
    per outage): a controller restart must not turn into 429s or into a wider bound.
    """

    def __init__(self, admissions: Iterable[Admission], read: Callable[[], Membership],
                 period_s: float = 1.0) -> None:
        self._admissions = list(admissions)
        self._read = read
        self.period_s = period_s
        self.membership: Membership | None = None
        self._task: asyncio.Task | None = None
        self._failing = False

    def apply(self, membership: Membership) -> None:
        """Set every admission's limit to this replica's share under `membership`."""
        replicas = membership.effective_replicas
        for admission in self._admissions:
            admission.limit = share(admission.bound, replicas, membership.rank)
        self.membership = membership

    def refresh_now(self) -> bool:
        """Read the membership and re-split, blocking (a replica's constructor); True if the read worked."""
        return self._settle(self._try_read())

    def start(self) -> None:
        """Start the refresh loop on the running event loop (idempotent)."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="admission-split")

    def _try_read(self) -> Membership | None:
        try:
            return self._read()
        except Exception as exc:  # controller restarting, replica context not ready: keep the last split
            (log.debug if self._failing else log.warning)("reading the ingress membership failed: %r", exc)
            self._failing = True
            return None

    def _settle(self, membership: Membership | None) -> bool:
        if membership is None:
            return False
        self._failing = False
        if membership != self.membership:
            self.apply(membership)
        return True

    def period(self) -> float:
        """Seconds until the next read: period_s, stretched so the whole deployment reads the controller at
        most MAX_READS_PER_S times a second (every replica reads; the controller is one actor, and with
        many replicas each share, hence what a late re-split can add, is small)."""
        replicas = self.membership.effective_replicas if self.membership is not None else 1
        return max(self.period_s, replicas / MAX_READS_PER_S)

    async def _loop(self) -> None:
        while True:
            # The read runs in a thread; the limits change on the event loop, between admissions.
            self._settle(await asyncio.to_thread(self._try_read))
            await asyncio.sleep(self.period())

"""A product's bound split across ingress replicas (cluster/admission_split.py), on its own (no Ray): the
shares' arithmetic, a re-split with samples in flight, a failed membership read, and a replica past the
bound."""

from __future__ import annotations

import asyncio

import pytest

from cluster.admission import Admission
from cluster.admission_split import ALONE, AdmissionSplit, Membership, share
from cluster.http_edge import APIError

BOUNDS = range(1, 70)
COUNTS = range(1, 13)


@pytest.mark.parametrize("bound", BOUNDS)
def test_the_shares_of_every_replica_count_sum_to_the_bound(bound: int) -> None:
    for replicas in COUNTS:
        shares = [share(bound, replicas, rank) for rank in range(replicas)]
        assert sum(shares) == bound, (bound, replicas, shares)
        assert max(shares) - min(shares) <= 1  # as even as integers allow
        assert all(s == -(-(bound - rank) // replicas) for rank, s in enumerate(shares))  # ceil((B - rank) / W)


@pytest.mark.parametrize("bound", BOUNDS)
def test_a_kept_rank_never_gets_more_when_replicas_are_added(bound: int) -> None:
    """Serve keeps a replica's rank while others start: a scale-up only shrinks the shares already held, so
    replicas that have not re-read the membership yet over-admit by at most the new replica's share."""
    for replicas in COUNTS:
        for rank in range(replicas):
            assert share(bound, replicas + 1, rank) <= share(bound, replicas, rank)
        stale_total = sum(share(bound, replicas, r) for r in range(replicas)) + share(bound, replicas + 1, replicas)
        assert stale_total <= bound + -(-bound // (replicas + 1))


def test_a_rank_outside_the_count_is_refused_and_counts_as_one_more_replica() -> None:
    with pytest.raises(ValueError):
        share(8, 2, 2)
    with pytest.raises(ValueError):
        share(8, 0, 0)
    assert Membership(rank=3, replicas=2).effective_replicas == 4
    assert Membership(rank=0, replicas=0).effective_replicas == 1
    assert ALONE.effective_replicas == 1


def _refused(admission: Admission, samples: int = 1) -> bool:
    try:
        admission.admit(samples)
    except APIError as exc:
        assert exc.status == 429
        return True
    return False


def test_a_resplit_with_samples_in_flight_admits_nothing_past_the_new_share() -> None:
    chat, report = Admission("chat", limit=9), Admission("report", limit=4)
    split = AdmissionSplit([chat, report], read=lambda: ALONE)
    split.apply(ALONE)
    assert (chat.limit, report.limit) == (9, 4)
    chat.admit(6)
    split.apply(Membership(rank=0, replicas=3))  # two more ingress replicas: 3 of chat's 9, 2 of report's 4
    assert (chat.limit, report.limit) == (3, 2) and chat.bound == 9
    assert chat.inflight == 6  # what is in flight stays until it ends...
    assert _refused(chat)  # ...and nothing new is admitted past the new share meanwhile
    chat.inflight = 3  # three ended
    assert _refused(chat)
    chat.inflight = 2
    assert not _refused(chat) and chat.inflight == 3
    assert _refused(chat)
    split.apply(Membership(rank=2, replicas=3))  # a later rank: the smaller shares
    assert (chat.limit, report.limit) == (3, 1)


def test_a_replica_past_the_bound_refuses_everything_at_once() -> None:
    admission = Admission("p", limit=2)
    AdmissionSplit([admission], read=lambda: ALONE).apply(Membership(rank=2, replicas=3))
    assert admission.limit == 0 and _refused(admission)


def test_a_failed_read_keeps_the_last_split_and_the_loop_re_splits() -> None:
    admission = Admission("p", limit=10)
    answers: list[Membership | Exception] = [Membership(rank=1, replicas=2), RuntimeError("controller away")]

    def read() -> Membership:
        answer = answers.pop(0) if len(answers) > 1 else answers[0]
        if isinstance(answer, Exception):
            raise answer
        return answer

    split = AdmissionSplit([admission], read=read, period_s=0.01)
    assert split.refresh_now() and admission.limit == 5
    assert not split.refresh_now() and admission.limit == 5  # not the whole bound, not 0

    async def loop_until_resplit() -> None:
        answers[0] = Membership(rank=1, replicas=5)
        split.start()
        async with asyncio.timeout(5):
            while admission.limit != 2:
                await asyncio.sleep(0.01)
        split._task.cancel()

    asyncio.run(loop_until_resplit())
    assert split.membership == Membership(rank=1, replicas=5)


def test_many_replicas_read_the_membership_less_often() -> None:
    """The deployment as a whole reads the controller at most MAX_READS_PER_S times a second."""
    from cluster.admission_split import MAX_READS_PER_S

    split = AdmissionSplit([Admission("p", limit=10)], read=lambda: ALONE, period_s=1.0)
    assert split.period() == 1.0  # before the first read: one replica
    split.apply(Membership(rank=0, replicas=4))
    assert split.period() == 1.0
    split.apply(Membership(rank=3, replicas=64))
    assert split.period() == 64 / MAX_READS_PER_S
    assert 64 / split.period() <= MAX_READS_PER_S

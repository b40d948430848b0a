"""Admission: limits, the central FIFO queue, slots handed over on every capacity change, 429 with
Retry-After, and the lease that records each dispatch's outcome. Pure asyncio, no servers."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Collection

import pytest

from gateway.config import Limits, OutlierDetection
from gateway.errors import NoHealthyReplica, Overloaded
from gateway.pool.admission import Admission, NoUntriedReplica
from gateway.pool.lease import DrainRate, Lease, outcome_of
from gateway.pool.replicas import ReplicaPool
from gateway.pool.rules import Rules
from gateway.routing.options import PolicyOptions
from gateway.routing.policies import LeastOutstandingRequests, RoundRobinPolicy, make_policy
from gateway.routing.replica import Replica
from gateway.routing.request import NO_INFO, RequestInfo

URLS = ["http://a:1", "http://b:1"]


def _setup(
    urls: list[str] = URLS, outlier: OutlierDetection | None = None, **limits: object
) -> tuple[ReplicaPool, Admission]:
    pool = ReplicaPool(urls)
    admission = Admission(pool)
    policy = LeastOutstandingRequests(random.Random(0), PolicyOptions())
    admission.configure(Rules(policy, Limits(**limits), outlier))  # type: ignore[arg-type]
    return pool, admission


async def _hold(admission: Admission, tried: Collection[Replica] = ()) -> Lease:
    return Lease(admission, await admission.acquire(NO_INFO, tried), NO_INFO)


def _waiting(admission: Admission, tried: Collection[Replica] = ()) -> asyncio.Task[Replica]:
    return asyncio.create_task(admission.acquire(NO_INFO, tried))


async def _settle() -> None:
    for _ in range(3):
        await asyncio.sleep(0)


async def test_without_limits_the_policy_chooses_and_the_count_moves() -> None:
    pool, admission = _setup()
    admission.configure(Rules(RoundRobinPolicy(random.Random(0), PolicyOptions()), Limits()))
    first, second = await _hold(admission), await _hold(admission)
    assert {first.replica.url, second.replica.url} == set(URLS)
    assert pool.outstanding == 2 and first.replica.outstanding == 1
    first.close()
    first.close()  # a lease closes once
    assert pool.outstanding == 1 and first.replica.outstanding == 0


async def test_a_lease_block_releases_however_it_ends() -> None:
    pool, admission = _setup()
    with pytest.raises(RuntimeError):
        async with admission.lease(RequestInfo(tokens=7)) as lease:
            assert lease.replica.outstanding == 1 and lease.replica.outstanding_tokens == 7
            raise RuntimeError
    assert pool.outstanding == 0 and all(r.outstanding_tokens == 0 for r in pool.all())


async def test_a_full_fleet_queues_and_the_first_freed_slot_serves_the_first_waiter() -> None:
    pool, admission = _setup(max_outstanding_per_replica=1, max_queue=4)
    a, b = await _hold(admission), await _hold(admission)
    waiters = [_waiting(admission) for _ in range(2)]
    await _settle()
    assert admission.queued == 2 and not any(w.done() for w in waiters)
    b.close()
    assert await asyncio.wait_for(waiters[0], 1) is b.replica  # the slot that freed, FIFO
    assert not waiters[1].done()
    a.close()
    assert await asyncio.wait_for(waiters[1], 1) is a.replica
    assert admission.queued == 0 and pool.outstanding == 2


async def test_a_full_queue_is_a_fast_429_with_retry_after() -> None:
    _, admission = _setup(max_outstanding=1, max_queue=1)
    await _hold(admission)
    queued = _waiting(admission)
    await _settle()
    with pytest.raises(Overloaded) as info:
        await admission.acquire(NO_INFO)
    assert info.value.status == 429
    assert 1 <= int(info.value.headers["Retry-After"]) <= 60
    assert "queue is full" in str(info.value)
    queued.cancel()
    await asyncio.gather(queued, return_exceptions=True)
    assert admission.queued == 0


async def test_queue_timeout_is_a_429_naming_the_setting() -> None:
    _, admission = _setup(max_outstanding=1, max_queue=5, queue_timeout_s=0.05)
    await _hold(admission)
    with pytest.raises(Overloaded, match="queue_timeout_s"):
        await admission.acquire(NO_INFO)
    assert admission.queued == 0


async def test_retries_exclude_replicas_already_tried() -> None:
    pool, admission = _setup()
    a = (await _hold(admission)).replica
    b = (await _hold(admission, tried=[a])).replica
    assert b is not a
    with pytest.raises(NoUntriedReplica):
        await admission.acquire(NO_INFO, [a, b])
    for replica in pool.all():
        pool.set_healthy(replica, False)
    with pytest.raises(NoHealthyReplica):
        await admission.acquire(NO_INFO)


def test_drain_rate_counts_the_last_whole_second() -> None:
    now = [100.2]
    rate = DrainRate(lambda: now[0])
    for _ in range(30):
        rate.tick()
    assert rate.per_second() == 30  # the current second so far
    now[0] = 101.1
    rate.tick()
    assert rate.per_second() == 30  # the last whole second
    now[0] = 103.5
    assert rate.per_second() == 0  # nothing finished for over a second


async def test_a_replicas_own_max_concurrency_overrides_the_default_limit() -> None:
    pool, admission = _setup(max_outstanding_per_replica=1, max_queue=4)
    pool.update(URLS, {URLS[0]: 3})
    got = [await _hold(admission) for _ in range(4)]
    assert sorted(lease.replica.url for lease in got) == [URLS[0]] * 3 + [URLS[1]]
    waiting = _waiting(admission)
    await _settle()
    assert admission.queued == 1  # both replicas are at their own limits
    next(lease for lease in got if lease.replica.url == URLS[1]).close()
    assert (await waiting).url == URLS[1]


# Wake-ups: every way capacity can grow hands the slot to a waiter (issue 13, A.1).


async def test_a_replica_added_by_reload_serves_the_queued_request_at_once() -> None:
    pool, admission = _setup(urls=URLS[:1], max_outstanding_per_replica=1, max_queue=4)
    await _hold(admission)
    waiting = _waiting(admission)
    await _settle()
    pool.update(URLS)
    assert (await asyncio.wait_for(waiting, 1)).url == URLS[1]


async def test_a_limit_raised_by_reload_lets_waiters_go() -> None:
    pool, admission = _setup(urls=URLS[:1], max_outstanding_per_replica=1, max_queue=4)
    await _hold(admission)
    waiting = _waiting(admission)
    await _settle()
    admission.configure(Rules(admission.rules.policy, Limits(max_outstanding_per_replica=2)))
    assert (await asyncio.wait_for(waiting, 1)).url == URLS[0]
    assert pool.outstanding == 2


async def test_a_replica_turning_healthy_serves_the_queued_request() -> None:
    pool, admission = _setup(max_outstanding_per_replica=1, max_queue=4)
    b = pool.get(URLS[1])
    assert b is not None
    pool.set_healthy(b, False)
    await _hold(admission)
    waiting = _waiting(admission)
    await _settle()
    pool.set_healthy(b, True)
    assert await asyncio.wait_for(waiting, 1) is b


async def test_an_ejection_running_out_serves_the_queued_request() -> None:
    pool, admission = _setup(max_outstanding_per_replica=1, max_queue=4)
    b = pool.get(URLS[1])
    assert b is not None
    pool.eject(b, 0.05)
    await _hold(admission)
    waiting = _waiting(admission)
    assert await asyncio.wait_for(waiting, 2) is b  # nothing else happens: a timer looks again


async def test_a_waiter_that_cannot_use_the_freed_slot_passes_it_on() -> None:
    _, admission = _setup(max_outstanding_per_replica=1, max_queue=4)
    a, b = await _hold(admission), await _hold(admission)
    retry = _waiting(admission, tried=[a.replica])  # first in the queue, but has tried a
    fresh = _waiting(admission)
    await _settle()
    a.close()
    assert await asyncio.wait_for(fresh, 1) is a.replica
    assert not retry.done() and admission.queued == 1
    b.close()
    assert await asyncio.wait_for(retry, 1) is b.replica


async def test_a_slot_granted_as_the_client_leaves_goes_to_the_next_waiter() -> None:
    pool, admission = _setup(urls=URLS[:1], max_outstanding_per_replica=1, max_queue=4)
    a = await _hold(admission)
    leaving, next_one = _waiting(admission), _waiting(admission)
    await _settle()
    a.close()  # hands the slot to `leaving` ...
    leaving.cancel()  # ... whose client goes away before it runs
    await asyncio.gather(leaving, return_exceptions=True)
    assert await asyncio.wait_for(next_one, 1) is a.replica
    assert pool.outstanding == 1 and a.replica.requests_total == 2


async def test_a_slot_granted_as_the_queue_timeout_fires_is_used() -> None:
    pool, admission = _setup(urls=URLS[:1], max_outstanding=1, max_queue=4, queue_timeout_s=1)
    loop = asyncio.get_running_loop()
    now = [loop.time()]
    loop.time = lambda: now[0]  # type: ignore[method-assign]  # the loop's clock, stepped here
    a = await _hold(admission)
    waiting = _waiting(admission)
    await _settle()
    # The release and the queue timeout fall due in the same loop turn, the release first.
    loop.call_at(now[0] + 1 - 1e-6, a.close)
    now[0] += 1
    assert await asyncio.wait_for(waiting, 1) is a.replica  # the grant wins over the 429
    assert pool.outstanding == 1


async def test_a_waiter_whose_every_replica_was_tried_stops_waiting() -> None:
    pool, admission = _setup(max_outstanding_per_replica=1, max_queue=4)
    a, b = await _hold(admission), await _hold(admission)
    retry = _waiting(admission, tried=[a.replica])
    await _settle()
    pool.update([a.replica.url])  # b leaves: every replica left was tried
    with pytest.raises(NoUntriedReplica):
        await asyncio.wait_for(retry, 1)
    a.close()
    b.close()
    assert pool.outstanding == 0


# Outcomes (issue 13, A.4): a refusal or a client that left is not service.


def test_outcomes_of_statuses() -> None:
    assert outcome_of(200) == outcome_of(404) == "served"
    assert outcome_of(502) == outcome_of(503) == outcome_of(504) == "failed"
    assert outcome_of(429) == outcome_of(499) == "not_served"


def test_a_500_is_the_replicas_failure_only_when_count_5xx_says_so() -> None:
    # Issue 30, A.1: a 500 may be caused by the request (input the replica could not handle).
    for code in (500, 501, 505, 599):
        assert outcome_of(code) == "not_served"
        assert outcome_of(code, count_5xx=True) == "failed"
    assert outcome_of(502, count_5xx=False) == "failed"


async def test_500s_never_eject_by_default_and_do_so_with_count_5xx() -> None:
    for count_5xx, ejected in ((False, False), (True, True)):
        settings = OutlierDetection(consecutive_failures=3, count_5xx=count_5xx)
        pool, admission = _setup(urls=URLS[:1], outlier=settings)
        replica = pool.all()[0]
        for _ in range(3):
            lease = await _hold(admission)
            lease.code = 500
            lease.close()
        assert (replica.ejected_until > 0) is ejected
        assert replica.consecutive_failures == (3 if count_5xx else 0)
        assert pool.outstanding == 0


async def test_429_and_499_neither_reset_the_failure_streak_nor_feed_latency() -> None:
    settings = OutlierDetection(consecutive_failures=3)
    pool, admission = _setup(urls=URLS[:1], outlier=settings)
    replica = pool.all()[0]
    for code in (502, 504, 429, 499, 500, 503):
        lease = await _hold(admission)
        lease.code = code
        lease.close()
    # Three gateway failures in a row: the 429, 499 and 500 did not break the streak.
    assert replica.ejected_until > 0
    assert replica.latency_ewma_s == 0.0  # and none of them was a latency sample


async def test_a_lease_carries_its_decision_strategy_reason_and_scores_when_asked() -> None:
    pool, admission = _setup(max_outstanding_per_replica=1)
    policy = make_policy("least_outstanding_requests", random.Random(0))
    admission.configure(Rules(policy, Limits(max_outstanding_per_replica=1, max_queue=8)))
    async with admission.lease() as first:
        assert (first.decision.replica, first.decision.strategy) == (first.replica, policy.name)
        assert (first.decision.reason, first.decision.scores) == ("free slot", None)
        admission.explain = True
        async with admission.lease() as second:
            # As at the choice: among the replicas with a free slot, before this request.
            assert second.decision.scores == {second.replica.url: 0.0}
            assert second.replica is not first.replica
            waiting = asyncio.create_task(_lease_reason(admission))
            await _settle()
        assert await waiting == "queued"  # handed over from the queue when `second` ended
    job = admission.take(pool.available())
    assert (job.decision.reason, job.decision.strategy) == ("job", "least_outstanding_requests")
    job.close()
    assert pool.outstanding == 0


async def _lease_reason(admission: Admission) -> str:
    async with admission.lease() as lease:
        return lease.decision.reason

"""Admission: limits, the central FIFO queue, 429 with Retry-After. Pure asyncio, no servers."""

from __future__ import annotations

import asyncio
import random

import pytest

from gateway.admission import Admission, DrainRate, NoUntriedReplica
from gateway.config import Limits
from gateway.errors import NoHealthyReplica, Overloaded
from gateway.policies import LeastOutstandingRequests, PolicyOptions, RoundRobinPolicy
from gateway.pool import ReplicaPool

URLS = ["http://a:1", "http://b:1"]


def _setup(**limits: object) -> tuple[ReplicaPool, Admission, Limits]:
    pool = ReplicaPool(URLS)
    return pool, Admission(pool), Limits(**limits)  # type: ignore[arg-type]


async def test_without_limits_the_policy_chooses_and_the_count_moves() -> None:
    pool, admission, limits = _setup()
    policy = RoundRobinPolicy(random.Random(0), PolicyOptions())
    first = await admission.acquire(policy, limits)
    second = await admission.acquire(policy, limits)
    assert {first.url, second.url} == set(URLS)
    assert pool.outstanding == 2 and first.outstanding == 1
    admission.release(first, failed=False, limits=limits)
    assert pool.outstanding == 1 and first.outstanding == 0


async def test_a_full_fleet_queues_and_the_first_freed_slot_serves_the_first_waiter() -> None:
    pool, admission, limits = _setup(max_outstanding_per_replica=1, max_queue=4)
    policy = LeastOutstandingRequests(random.Random(0), PolicyOptions())
    a = await admission.acquire(policy, limits)
    b = await admission.acquire(policy, limits)
    waiters = [asyncio.create_task(admission.acquire(policy, limits)) for _ in range(2)]
    await asyncio.sleep(0)
    assert admission.queued == 2 and not any(w.done() for w in waiters)
    admission.release(b, failed=False, limits=limits)
    assert await asyncio.wait_for(waiters[0], 1) is b  # the slot that freed, FIFO
    assert not waiters[1].done()
    admission.release(a, failed=False, limits=limits)
    assert await asyncio.wait_for(waiters[1], 1) is a
    assert admission.queued == 0 and pool.outstanding == 2


async def test_a_full_queue_is_a_fast_429_with_retry_after() -> None:
    _, admission, limits = _setup(max_outstanding=1, max_queue=1)
    policy = LeastOutstandingRequests(random.Random(0), PolicyOptions())
    await admission.acquire(policy, limits)
    queued = asyncio.create_task(admission.acquire(policy, limits))
    await asyncio.sleep(0)
    with pytest.raises(Overloaded) as info:
        await admission.acquire(policy, limits)
    assert info.value.status == 429
    assert 1 <= int(info.value.headers["Retry-After"]) <= 60
    assert "queue is full" in str(info.value)
    queued.cancel()
    await asyncio.gather(queued, return_exceptions=True)
    assert admission.queued == 0


async def test_queue_timeout_is_a_429_naming_the_setting() -> None:
    _, admission, limits = _setup(max_outstanding=1, max_queue=5, queue_timeout_s=0.05)
    policy = LeastOutstandingRequests(random.Random(0), PolicyOptions())
    await admission.acquire(policy, limits)
    with pytest.raises(Overloaded, match="queue_timeout_s"):
        await admission.acquire(policy, limits)
    assert admission.queued == 0


async def test_retries_exclude_replicas_already_tried() -> None:
    pool, admission, limits = _setup()
    policy = LeastOutstandingRequests(random.Random(0), PolicyOptions())
    a = await admission.acquire(policy, limits)
    b = await admission.acquire(policy, limits, exclude=[a])
    assert b is not a
    with pytest.raises(NoUntriedReplica):
        await admission.acquire(policy, limits, exclude=[a, b])
    for replica in pool.all():
        pool.set_healthy(replica, False)
    with pytest.raises(NoHealthyReplica):
        await admission.acquire(policy, limits)


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
    pool, admission, limits = _setup(max_outstanding_per_replica=1, max_queue=4)
    pool.update(URLS, {URLS[0]: 3})
    policy = LeastOutstandingRequests(random.Random(0), PolicyOptions())
    got = [await admission.acquire(policy, limits) for _ in range(4)]
    assert sorted(r.url for r in got) == [URLS[0]] * 3 + [URLS[1]]
    waiting = asyncio.create_task(admission.acquire(policy, limits))
    await asyncio.sleep(0)
    assert admission.queued == 1  # both replicas are at their own limits
    on_b = next(r for r in got if r.url == URLS[1])
    admission.release(on_b, failed=False, limits=limits)
    assert (await waiting).url == URLS[1]

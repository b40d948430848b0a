"""Property test of admission (issue 13, A.1): over random sequences of arrive / finish / add /
remove / eject / ejection end / health / limit / leave events, with a fake clock, no request
waits while a replica it may use has a free slot, and the counts are exact throughout."""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass, field

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.config import Limits, OutlierDetection
from gateway.errors import NoHealthyReplica, Overloaded
from gateway.pool.admission import Admission, NoUntriedReplica
from gateway.pool.lease import Lease
from gateway.pool.replicas import ReplicaPool
from gateway.pool.rules import Rules
from gateway.routing.options import PolicyOptions
from gateway.routing.policies import POLICIES
from gateway.routing.replica import Replica
from gateway.routing.request import NO_INFO

URLS = [f"http://r{i}:1" for i in range(4)]
STRATEGIES = ["least_outstanding_requests", "random", "round_robin", "power_of_two"]

index = st.integers(0, 7)
arrive = st.tuples(st.just("arrive"), st.sampled_from([0, 0, 1, 2, 4, 3]))  # a mask: tried
finish = st.tuples(st.just("finish"), index, st.sampled_from([200, 200, 500, 429, 499, 503]))
EVENTS = st.one_of(
    arrive,
    arrive,
    arrive,
    finish,
    finish,
    st.tuples(st.just("add"), st.integers(0, 3)),
    st.tuples(st.just("remove"), st.integers(0, 3)),
    st.tuples(st.just("eject"), st.integers(0, 3)),
    st.tuples(
        st.just("ejection_end"),
    ),
    st.tuples(st.just("health"), st.integers(0, 3), st.booleans()),
    st.tuples(st.just("limits"), st.integers(1, 3), st.sampled_from([None, 2, 4])),
    st.tuples(st.just("leave"), index),  # a waiter's client goes away (or its timeout fires)
    st.tuples(st.just("grant_then_leave"), index),  # a release, then the first waiter leaves
)


@dataclass
class World:
    pool: ReplicaPool
    admission: Admission
    now: list[float]
    urls: list[str]
    held: list[Lease] = field(default_factory=list)
    waiting: list[tuple[asyncio.Task[Replica], list[Replica]]] = field(default_factory=list)

    def limits(self) -> Limits:
        return self.admission.rules.limits


def _free(world: World) -> list[Replica]:
    """Free slots computed from first principles, not by admission's own code."""
    pool, limits = world.pool, world.limits()
    if limits.max_outstanding is not None and pool.outstanding >= limits.max_outstanding:
        return []
    cap = limits.max_outstanding_per_replica
    return [
        r
        for r in pool.active()
        if r.healthy
        and not (r.ejected_until and r.ejected_until > world.now[0])
        and r.outstanding < (r.max_concurrency or cap or 1 << 30)
    ]


async def _settle(world: World) -> None:
    for _ in range(4):
        await asyncio.sleep(0)
    still: list[tuple[asyncio.Task[Replica], list[Replica]]] = []
    for task, tried in world.waiting:
        if not task.done():
            still.append((task, tried))
        elif not task.cancelled() and task.exception() is None:
            world.held.append(Lease(world.admission, task.result(), NO_INFO))
        else:
            assert task.cancelled() or isinstance(
                task.exception(), NoUntriedReplica | NoHealthyReplica | Overloaded
            ), task.exception()
    world.waiting = still


def _check(world: World) -> None:
    free = _free(world)
    for _, tried in world.waiting:
        usable = [r for r in free if r not in tried]
        assert not usable, f"a request waits while {[r.url for r in usable]} have free slots"
    for replica in world.pool.all():
        held = sum(1 for lease in world.held if lease.replica is replica)
        assert replica.outstanding == held, (replica.url, replica.outstanding, held)
    assert world.pool.outstanding == len(world.held)
    assert world.admission.queued == len(world.waiting)


def _replica(world: World, i: int) -> Replica | None:
    return world.pool.get(URLS[i])


def _apply(world: World, event: tuple[object, ...]) -> None:  # noqa: PLR0912
    kind = event[0]
    pool, admission = world.pool, world.admission
    if kind == "arrive":
        mask = int(event[1])  # type: ignore[call-overload]
        tried = [r for i, r in enumerate(pool.active()) if mask >> i & 1]
        task = asyncio.create_task(admission.acquire(NO_INFO, tried))
        world.waiting.append((task, tried))
    elif kind == "finish" and world.held:
        lease = world.held.pop(int(event[1]) % len(world.held))  # type: ignore[call-overload]
        lease.code = int(event[2])  # type: ignore[call-overload]
        lease.close()
    elif kind == "add" and URLS[int(event[1])] not in world.urls:  # type: ignore[call-overload]
        world.urls.append(URLS[int(event[1])])  # type: ignore[call-overload]
        pool.update(world.urls)
    elif kind == "remove" and len(world.urls) > 1:
        url = URLS[int(event[1])]  # type: ignore[call-overload]
        if url in world.urls:
            world.urls.remove(url)
            pool.update(world.urls)
    elif kind == "eject":
        replica = _replica(world, int(event[1]))  # type: ignore[call-overload]
        if replica is not None:
            pool.eject(replica, 5.0)
    elif kind == "ejection_end":
        world.now[0] += 10.0
        admission.wake()  # what admission's timer does when the first ejection runs out
    elif kind == "health":
        replica = _replica(world, int(event[1]))  # type: ignore[call-overload]
        if replica is not None:
            pool.set_healthy(replica, bool(event[2]))
    elif kind == "limits":
        cap, total = int(event[1]), event[2]  # type: ignore[call-overload]
        limits = Limits(max_outstanding_per_replica=cap, max_outstanding=total, max_queue=64)
        admission.configure(
            Rules(admission.rules.policy, limits, admission.rules.outlier_detection)
        )
    elif kind == "leave" and world.waiting:
        world.waiting[int(event[1]) % len(world.waiting)][0].cancel()  # type: ignore[call-overload]
    elif kind == "grant_then_leave" and world.held:
        world.held.pop(int(event[1]) % len(world.held)).close()  # type: ignore[call-overload]
        if world.waiting:
            world.waiting[0][0].cancel()


async def _run(events: list[tuple[object, ...]], strategy: str, seed: int) -> None:
    now = [0.0]
    urls = URLS[:2]
    pool = ReplicaPool(urls, clock=lambda: now[0])
    admission = Admission(pool)
    policy = POLICIES[strategy](random.Random(seed), PolicyOptions(clock=lambda: now[0]))
    outliers = OutlierDetection(consecutive_failures=2, max_ejected_percent=50)
    limits = Limits(max_outstanding_per_replica=1, max_queue=64, queue_timeout_s=3600)
    admission.configure(Rules(policy, limits, outliers))
    world = World(pool, admission, now, list(urls))
    for event in events:
        _apply(world, event)
        await _settle(world)
        _check(world)
    # Teardown: everything waiting leaves, everything held ends; all counts back at zero.
    for task, _ in world.waiting:
        task.cancel()
    await _settle(world)
    for lease in world.held:
        lease.close()
    assert pool.outstanding == 0 and admission.queued == 0
    assert all(r.outstanding == 0 and r.outstanding_tokens == 0 for r in pool.all())


@settings(
    max_examples=1000,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    events=st.lists(EVENTS, min_size=10, max_size=50),
    strategy=st.sampled_from(STRATEGIES),
    seed=st.integers(0, 2**16),
)
def test_no_request_waits_while_a_replica_it_may_use_has_a_free_slot(
    events: list[tuple[object, ...]], strategy: str, seed: int
) -> None:
    asyncio.run(_run(events, strategy, seed))

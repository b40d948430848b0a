"""Admission under flow control: slots go strictly by class, then by the fairness rule; the
queue's TTL and its bound shed with a reason; a reload keeps the waiting requests; a replica's
reported capacity is its slot count while fresh. Pure asyncio, no servers."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest

from gateway.config import FlowControl, Limits
from gateway.errors import Overloaded
from gateway.flow.queue import Ticket
from gateway.pool.admission import DROPPED_HEADER, Admission
from gateway.pool.lease import Lease
from gateway.pool.replicas import ReplicaPool
from gateway.pool.rules import Rules
from gateway.pool.slots import engine_slots
from gateway.routing.options import PolicyOptions
from gateway.routing.policies import LeastOutstandingRequests
from gateway.routing.request import NO_INFO

CLASSES = [{"name": "interactive"}, {"name": "standard"}, {"name": "batch", "sheddable": True}]


def _flow(**fields: Any) -> FlowControl:
    return FlowControl.model_validate({"classes": CLASSES, **fields})


def _setup(flow: FlowControl, **limits: Any) -> tuple[ReplicaPool, Admission]:
    pool = ReplicaPool(["http://a:1"])
    admission = Admission(pool)
    admission.configure(_rules(flow, **limits))
    return pool, admission


def _rules(flow: FlowControl, **limits: Any) -> Rules:
    policy = LeastOutstandingRequests(random.Random(0), PolicyOptions())
    return Rules(policy, Limits(**{"max_outstanding_per_replica": 1, **limits}), flow=flow)


def _ticket(flow: FlowControl, tenant: str, name: str, cost: float = 1.0) -> Ticket:
    return Ticket(tenant, name, flow.rank(name), 1.0, cost)


async def _settle() -> None:
    for _ in range(3):
        await asyncio.sleep(0)


def _waiting(
    admission: Admission, ticket: Ticket, order: list[str], name: str
) -> asyncio.Task[None]:
    """A request that waits for its slot, notes its turn and gives the slot back at once."""

    async def wait() -> None:
        replica = await admission.acquire(NO_INFO, (), ticket)
        order.append(name)
        Lease(admission, replica, NO_INFO).close()

    return asyncio.create_task(wait())


async def _drain(tasks: list[asyncio.Task[None]], held: Lease) -> None:
    held.close()
    await asyncio.wait_for(asyncio.gather(*tasks), 2)


async def test_slots_go_strictly_by_class_then_in_order_within_a_tenant() -> None:
    flow = _flow(fairness="fcfs")
    pool, admission = _setup(flow)
    held = Lease(admission, await admission.acquire(NO_INFO), NO_INFO)
    order: list[str] = []
    tasks = [
        _waiting(admission, _ticket(flow, "t", "batch"), order, "b1"),
        _waiting(admission, _ticket(flow, "t", "standard"), order, "s1"),
        _waiting(admission, _ticket(flow, "u", "interactive"), order, "i1"),
        _waiting(admission, _ticket(flow, "t", "standard"), order, "s2"),
    ]
    await _settle()
    assert admission.waiting() == {(2, "t"): 1, (1, "t"): 2, (0, "u"): 1}
    await _drain(tasks, held)
    assert order == ["i1", "s1", "s2", "b1"]
    assert pool.outstanding == 0 and admission.queued == 0


async def test_token_fairness_lets_the_light_tenant_through_first() -> None:
    flow = _flow(fairness="tokens")
    pool, admission = _setup(flow)
    held = Lease(admission, await admission.acquire(NO_INFO), NO_INFO)
    admission.service.charge("heavy", 1000)
    order: list[str] = []
    tasks = [
        _waiting(admission, _ticket(flow, "heavy", "standard", 100), order, "h1"),
        _waiting(admission, _ticket(flow, "heavy", "standard", 100), order, "h2"),
        _waiting(admission, _ticket(flow, "light", "standard", 100), order, "l1"),
        _waiting(admission, _ticket(flow, "light", "standard", 100), order, "l2"),
    ]
    await _settle()
    await _drain(tasks, held)
    assert order[:2] == ["l1", "l2"] and pool.outstanding == 0


async def test_a_request_queued_past_the_ttl_gets_a_429_that_says_so() -> None:
    flow = _flow(queue_ttl_s=0.05)
    pool, admission = _setup(flow)
    left: list[tuple[str, str]] = []
    admission.dequeued.append(lambda ticket, waited, how: left.append((ticket.tenant, how)))
    held = Lease(admission, await admission.acquire(NO_INFO), NO_INFO)
    with pytest.raises(Overloaded) as refused:
        await admission.acquire(NO_INFO, (), _ticket(flow, "t", "standard"))
    assert refused.value.status == 429
    assert refused.value.headers[DROPPED_HEADER] == "ttl-expired"
    assert "flow_control.queue_ttl_s = 0.05 s" in str(refused.value)
    assert left == [("t", "ttl-expired")]
    held.close()
    assert pool.outstanding == 0 and admission.queued == 0


async def test_a_full_queue_sheds_the_newest_sheddable_request_for_a_more_important_one() -> None:
    flow = _flow(max_queued=2)
    pool, admission = _setup(flow)
    held = Lease(admission, await admission.acquire(NO_INFO), NO_INFO)
    order: list[str] = []
    b1 = _waiting(admission, _ticket(flow, "t", "batch"), order, "b1")
    b2 = _waiting(admission, _ticket(flow, "t", "batch"), order, "b2")
    await _settle()
    with pytest.raises(Overloaded) as refused:  # batch itself is the newest of its class
        await admission.acquire(NO_INFO, (), _ticket(flow, "t", "batch"))
    assert refused.value.headers[DROPPED_HEADER] == "queue-full"
    s1 = _waiting(admission, _ticket(flow, "u", "standard"), order, "s1")
    await _settle()
    with pytest.raises(Overloaded) as evicted:
        await b2
    assert evicted.value.headers[DROPPED_HEADER] == "evicted"
    s2 = _waiting(admission, _ticket(flow, "u", "standard"), order, "s2")
    await _settle()
    assert b1.done() and b1.exception() is not None  # the next newest batch request
    with pytest.raises(Overloaded) as full:  # standard is not sheddable: the arrival is refused
        await admission.acquire(NO_INFO, (), _ticket(flow, "u", "standard"))
    assert full.value.headers[DROPPED_HEADER] == "queue-full"
    await _drain([s1, s2], held)
    assert order == ["s1", "s2"] and pool.outstanding == 0 and admission.queued == 0


async def test_a_reload_keeps_the_waiting_requests_under_the_new_classes() -> None:
    flow = _flow(fairness="fcfs")
    pool, admission = _setup(flow)
    held = Lease(admission, await admission.acquire(NO_INFO), NO_INFO)
    order: list[str] = []
    tasks = [
        _waiting(admission, _ticket(flow, "t", "interactive"), order, "i1"),
        _waiting(admission, _ticket(flow, "t", "batch"), order, "b1"),
    ]
    await _settle()
    reordered = FlowControl.model_validate(
        {"classes": [{"name": "batch"}, {"name": "interactive"}], "fairness": "fcfs"}
    )
    admission.configure(_rules(reordered))
    assert admission.queued == 2
    await _drain(tasks, held)
    assert order == ["b1", "i1"] and pool.outstanding == 0


async def test_a_fresh_reported_capacity_is_the_replicas_slot_count() -> None:
    flow = _flow()
    pool = ReplicaPool(["http://a:1"])
    admission = Admission(pool)
    policy = LeastOutstandingRequests(random.Random(0), PolicyOptions())
    admission.configure(Rules(policy, Limits(max_outstanding_per_replica=1), flow=flow))
    (replica,) = pool.active()
    assert admission.slots(replica) == 1  # nothing reported yet: the configured slots
    pool.report(replica, {"capacity": 3, "inflight": 0}, ours=0)
    assert admission.slots(replica) == 3
    replica.reported_at -= 10  # stale: the configured slots again
    assert admission.slots(replica) == 1


@pytest.mark.parametrize(
    ("report", "remote", "slots"),
    [
        ({"running": 0, "queued": 0}, 0, 4),  # idle: room to start
        ({"running": 10, "queued": 0, "kv_usage": 0.5}, 0, 15),  # room to grow by half
        ({"running": 10, "queued": 0}, 6, 4 + 5),  # six of those are another gateway's
        ({"running": 10, "queued": 2}, 0, 10),  # it queues: only what it runs
        ({"running": 10, "queued": 0, "kv_usage": 0.95}, 0, 10),  # its cache is full
        ({"running": 3, "queued": 5}, 3, 1),  # all others': one, so none waits forever
    ],
)
def test_an_engine_without_a_capacity_takes_more_only_while_it_queues_nothing(
    report: dict[str, float], remote: int, slots: int
) -> None:
    assert engine_slots(report, remote, 0.9) == slots


async def test_a_fresh_engine_report_sets_the_slots_and_a_stale_one_falls_back() -> None:
    pool = ReplicaPool(["http://a:1"])
    admission = Admission(pool)
    policy = LeastOutstandingRequests(random.Random(0), PolicyOptions())
    admission.configure(Rules(policy, Limits(max_outstanding_per_replica=2), flow=_flow()))
    (replica,) = pool.active()
    pool.report(replica, {"running": 8, "queued": 3, "inflight": 11}, ours=11)
    assert admission.slots(replica) == 8
    replica.reported_at -= 10
    assert admission.slots(replica) == 2


async def test_a_reserve_keeps_slots_for_the_most_important_class() -> None:
    flow = _flow(reserve_percent=50)
    pool, admission = _setup(flow, max_outstanding_per_replica=4)
    standard = _ticket(flow, "t", "standard")
    held = [Lease(admission, await admission.acquire(NO_INFO, (), standard), NO_INFO)]
    held.append(Lease(admission, await admission.acquire(NO_INFO, (), standard), NO_INFO))
    order: list[str] = []
    waiting = _waiting(admission, standard, order, "s3")  # half the slots are reserved
    await _settle()
    assert admission.queued == 1 and pool.outstanding == 2
    interactive = _ticket(flow, "u", "interactive")
    held.append(Lease(admission, await admission.acquire(NO_INFO, (), interactive), NO_INFO))
    assert pool.outstanding == 3 and admission.queued == 1
    held.pop(0).close()
    await _settle()
    assert admission.queued == 1  # two busy: still at the standard share
    held.pop(0).close()  # below it again: the standard waiter goes
    await asyncio.wait_for(waiting, 1)
    assert order == ["s3"]
    for lease in held:
        lease.close()
    assert pool.outstanding == 0


async def test_a_reload_gives_the_waiting_requests_their_tenants_new_weights() -> None:
    flow = _flow(fairness="tokens")
    pool, admission = _setup(flow)
    held = Lease(admission, await admission.acquire(NO_INFO), NO_INFO)
    admission.service.charge("a", 100)
    admission.service.charge("b", 150)
    order: list[str] = []
    tasks = [
        _waiting(admission, _ticket(flow, "a", "standard"), order, "a1"),
        _waiting(admission, _ticket(flow, "b", "standard"), order, "b1"),
    ]
    await _settle()
    policy = LeastOutstandingRequests(random.Random(0), PolicyOptions())
    limits = Limits(max_outstanding_per_replica=1)
    admission.configure(Rules(policy, limits, flow=flow, weights={"b": 3.0}))  # b: 150/3 < 100
    await _drain(tasks, held)
    assert order == ["b1", "a1"] and pool.outstanding == 0

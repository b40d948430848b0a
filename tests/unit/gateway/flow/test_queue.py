"""The fair queue's order: strict classes, fairness between tenants (fcfs, round robin, weighted
tokens with decay), FIFO within a tenant, the victim when full, and a reload's reshaping. Pure,
with a fake clock."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import replace

import pytest

from gateway.flow.queue import FlowQueue, Ticket
from gateway.flow.service import LocalService, Usage


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _queue(
    fairness: str = "tokens", classes: int = 3, sheddable: frozenset[int] = frozenset()
) -> tuple[FlowQueue[str], Clock]:
    clock = Clock()
    return FlowQueue(classes, fairness, LocalService(60.0, clock), sheddable), clock  # type: ignore[arg-type]


def _take(queue: FlowQueue[str]) -> str:
    entry = next(queue.in_order())
    queue.granted(entry)
    return entry.item


def test_classes_are_strict_and_a_tenant_is_served_in_order() -> None:
    queue, _ = _queue("fcfs")
    queue.push("b1", Ticket("t", "batch", 2))
    queue.push("s1", Ticket("t", "standard", 1))
    queue.push("b2", Ticket("u", "batch", 2))
    queue.push("i1", Ticket("u", "interactive", 0))
    queue.push("s2", Ticket("t", "standard", 1))
    assert [_take(queue) for _ in range(5)] == ["i1", "s1", "s2", "b1", "b2"]
    assert len(queue) == 0


def test_round_robin_gives_tenants_turns_whatever_their_backlog() -> None:
    queue, _ = _queue("round_robin", classes=1)
    for i in range(6):
        queue.push(f"a{i}", Ticket("a"))
    for i in range(2):
        queue.push(f"b{i}", Ticket("b"))
    assert [_take(queue) for _ in range(6)] == ["a0", "b0", "a1", "b1", "a2", "a3"]


@pytest.mark.parametrize("weights", [(1.0, 1.0), (1.0, 3.0), (2.0, 1.0)])
def test_token_fairness_serves_weighted_tokens_in_the_ratio_of_the_weights(
    weights: tuple[float, float],
) -> None:
    """Both tenants always have requests waiting; C sends four times as many as D, of random
    sizes: the weighted tokens served converge to the weights' ratio."""
    queue, clock = _queue("tokens", classes=1)
    rng = random.Random(7)
    served: Counter[str] = Counter()
    for i in range(400):
        queue.push(f"c{i}", Ticket("c", weight=weights[0], cost=rng.randint(50, 500)))
        if i % 4 == 0:
            queue.push(f"d{i}", Ticket("d", weight=weights[1], cost=rng.randint(50, 500)))
    for _ in range(150):  # D never runs out: 100 queued, the rest refilled below
        entry = next(queue.in_order())
        queue.granted(entry)
        served[entry.ticket.tenant] += entry.ticket.cost
        if entry.ticket.tenant == "d":
            queue.push("d+", Ticket("d", weight=weights[1], cost=rng.randint(50, 500)))
        clock.now += 0.1
    share = served["d"] / (served["c"] + served["d"])
    assert share == pytest.approx(weights[1] / sum(weights), abs=0.05)


def test_fewer_longer_requests_do_not_buy_a_larger_share() -> None:
    """E sends requests ten times the size of F's: tokens served stay even."""
    queue, clock = _queue("tokens", classes=1)
    served: Counter[str] = Counter()
    for i in range(200):
        queue.push(f"e{i}", Ticket("e", cost=Usage(100, 450).weighted(2.0)))
        queue.push(f"f{i}", Ticket("f", cost=Usage(10, 45).weighted(2.0)))
    for _ in range(220):
        entry = next(queue.in_order())
        queue.granted(entry)
        served[entry.ticket.tenant] += entry.ticket.cost
        clock.now += 0.05
    assert served["e"] / (served["e"] + served["f"]) == pytest.approx(0.5, abs=0.05)


def test_service_decays_with_its_half_life() -> None:
    clock = Clock()
    service = LocalService(10.0, clock)
    service.charge("a", 800)
    clock.now = 10.0
    assert service.value("a") == pytest.approx(400)
    clock.now = 30.0
    assert service.value("a") == pytest.approx(100)
    service.charge("a", -1000)  # a correction never takes it below zero
    assert service.value("a") == 0.0


def test_a_tenant_that_was_served_long_ago_is_not_held_back_by_it() -> None:
    queue, clock = _queue("tokens", classes=1)
    queue.service.charge("old", 10_000)
    clock.now = 60.0 * 20  # twenty half-lives
    queue.push("n1", Ticket("new", cost=1))
    queue.service.charge("new", 5)
    queue.push("o1", Ticket("old", cost=1))
    assert _take(queue) == "o1"


def test_the_victim_is_the_newest_of_the_least_important_sheddable_class() -> None:
    queue, _ = _queue("fcfs", sheddable=frozenset({2}))
    queue.push("s1", Ticket("t", "standard", 1))
    assert queue.victim(Ticket("t", "interactive", 0)) is None  # standard is not sheddable
    queue.push("b1", Ticket("t", "batch", 2))
    queue.push("b2", Ticket("u", "batch", 2))
    victim = queue.victim(Ticket("t", "interactive", 0))
    assert victim is not None and victim.item == "b2"
    assert queue.victim(Ticket("t", "batch", 2)) is None  # the arriving one is the newest


def test_a_reshaped_queue_keeps_its_entries_and_their_order() -> None:
    queue, _ = _queue("fcfs")
    queue.push("b1", Ticket("t", "batch", 2))
    queue.push("s1", Ticket("t", "standard", 1))
    ranks = {"standard": 0, "batch": 1}  # interactive is gone
    reshaped = queue.reshaped(
        2, "fcfs", queue.service, frozenset(), lambda t: replace(t, rank=ranks[t.class_name])
    )
    assert len(reshaped) == 2
    assert [_take(reshaped) for _ in range(2)] == ["s1", "b1"]

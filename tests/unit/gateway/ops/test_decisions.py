"""The status page's recent decisions: the last SIZE leases that closed, newest first, with the
chosen replica's cost and the runner-up's as X-Infergate-Decision gives them."""

from __future__ import annotations

import math

from gateway.ops.decisions import RecentDecisions, costs
from gateway.pool.admission import Admission
from gateway.pool.lease import Lease
from gateway.pool.replicas import ReplicaPool
from gateway.routing.request import Decision, RequestInfo

A, B, C = "http://a:1", "http://b:1", "http://c:1"


def _lease(pool: ReplicaPool, url: str, code: int, scores: dict[str, float] | None) -> Lease:
    replica = pool.get(url)
    assert replica is not None
    decision = Decision(replica, "least_outstanding_requests", "free slot", scores)
    lease = Lease(Admission(pool), replica, RequestInfo(model="m"), decision)
    lease.code = code
    return lease


def test_the_last_leases_newest_first_with_costs() -> None:
    pool = ReplicaPool([A, B, C])
    now = iter(range(100))
    recent = RecentDecisions(size=3, clock=lambda: float(next(now)))
    for code in (500, 200, 429, 499):
        recent.add(_lease(pool, B, code, {A: 2.0, B: 1.0, C: 1.5}), 0.25)
    listed = recent.as_json()
    assert [d["code"] for d in listed] == [499, 429, 200]  # the first has left the ring
    assert listed[0] == {
        "at": 3.0,
        "model": "m",
        "replica": B,
        "strategy": "least_outstanding_requests",
        "reason": "free slot",
        "code": 499,
        "duration_s": 0.25,
        "cost": 1.0,
        "runner_up": C,
        "runner_up_cost": 1.5,
    }


def test_costs_are_null_where_the_decision_has_none() -> None:
    pool = ReplicaPool([A, B])
    nulls = {"cost": None, "runner_up": None, "runner_up_cost": None}
    assert costs(_lease(pool, A, 200, None).decision) == nulls  # not explained
    assert costs(_lease(pool, A, 200, {B: 1.0}).decision) == nulls  # chosen not scored
    alone = costs(_lease(pool, A, 200, {A: 4.0}).decision)
    assert alone == {"cost": 4.0, "runner_up": None, "runner_up_cost": None}
    endless = costs(_lease(pool, A, 200, {A: 1.0, B: math.inf}).decision)
    assert endless == {"cost": 1.0, "runner_up": B, "runner_up_cost": None}  # JSON has no inf

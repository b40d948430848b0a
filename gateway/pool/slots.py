"""Slots: how many requests a replica takes at once from this gateway, by the rules in force
(gateway/pool/admission.py waits for a free one).

Its own `max_concurrency`; under flow control, while its load report is fresh, the capacity it
reported (our replica), or for an engine that reports a queue but no capacity (vLLM, SGLang,
TGI) what `engine_slots` makes of its queue and KV cache; else the configured
`limits.max_outstanding_per_replica`; else no limit. With `flow_control.reserve_percent`, a class
below the first fills a replica only up to that share short of its slots (one at least).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from gateway.config import FlowControl
from gateway.pool.rules import Rules
from gateway.routing.replica import Replica


def slot_limit(replica: Replica, rules: Rules, now: float, rank: int = 0) -> int | None:
    """`replica`'s slots for a request of class `rank` (None: no limit)."""
    limit = _slots(replica, rules, now)
    if limit is not None and reserved_from(rules.flow, rank):
        assert rules.flow is not None
        limit = max(1, math.floor(limit * (1 - rules.flow.reserve_percent / 100)))
    return limit


def reserved_from(flow: FlowControl | None, rank: int) -> bool:
    """Requests of class `rank` leave the reserve to the most important class."""
    return rank > 0 and flow is not None and flow.reserve_percent > 0


def _slots(replica: Replica, rules: Rules, now: float) -> int | None:
    if replica.max_concurrency is not None:
        return replica.max_concurrency
    report = replica.reported
    fresh = now - replica.reported_at <= rules.max_age_s
    if rules.flow is not None and report is not None and fresh:
        capacity = report.get("capacity")
        if capacity:
            return int(capacity)
        if "running" in report:
            return engine_slots(report, replica.remote, rules.flow.kv_usage_threshold)
    return rules.limits.max_outstanding_per_replica


def engine_slots(report: Mapping[str, float], remote: int, kv_usage_threshold: float) -> int:
    """Slots for this gateway at an engine that reports its queue but no capacity: while it
    queues nothing and its KV cache is below the threshold, what it runs for us plus room to
    grow by half (at least 4) until the next report; once it queues or its cache is full, only
    what it runs for us, so the queue forms at the gateway, where classes and fairness act."""
    running = int(report.get("running", 0))
    ours = max(0, running - remote)  # its running requests that are ours (others' are remote)
    saturated = report.get("queued", 0) > 0 or report.get("kv_usage", 0.0) >= kv_usage_threshold
    if saturated:
        return max(1, ours)
    return ours + max(4, math.ceil(running / 2))

"""The status page's recent routing decisions: the last SIZE dispatches that ended (each attempt
of a retried request is one), newest first in /ui/status.json, with the strategy, why, and with
`routing.explain` the chosen replica's cost and the runner-up's (lower wins).

GatewayMetrics.lease_closed adds each lease as it closes: one clock read and one append to a
bounded ring, O(1); the decision is read into JSON only when the page asks. With `workers: N`,
each worker shows its own.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from gateway.pool.lease import Lease
from gateway.routing.request import Decision

SIZE = 50


# When it ended (wall clock), the model, the status the client got (499: it left), how long it
# took and the decision: a plain tuple (a NamedTuple costs twice as much on the request path).
Ended = tuple[float, str, int, float, Decision]


class RecentDecisions:
    def __init__(self, size: int = SIZE, clock: Callable[[], float] = time.time) -> None:
        self._ended: deque[Ended] = deque(maxlen=size)
        self._clock = clock

    def add(self, lease: Lease, duration_s: float) -> None:
        self._ended.append((self._clock(), lease.model, lease.code, duration_s, lease.decision))

    def as_json(self) -> list[dict[str, Any]]:
        return [_as_json(ended) for ended in reversed(self._ended)]


def _as_json(ended: Ended) -> dict[str, Any]:
    at, model, code, duration_s, decision = ended
    return {
        "at": round(at, 3),
        "model": model or None,
        "replica": decision.replica.url,
        "strategy": decision.strategy or None,
        "reason": decision.reason,
        "code": code,
        "duration_s": round(duration_s, 6),
        **costs(decision),
    }


def costs(decision: Decision) -> dict[str, Any]:
    """The chosen replica's cost and the cheapest other's, as X-Infergate-Decision tells them
    (gateway/datapath/headers.py `explained`); nulls where the policy has no costs or the
    decision was not explained."""
    scores, chosen = decision.scores, decision.replica.url
    if not scores or chosen not in scores:
        return {"cost": None, "runner_up": None, "runner_up_cost": None}
    others = [(cost, url) for url, cost in scores.items() if url != chosen]
    cost, url = min(others) if others else (None, None)
    return {"cost": _finite(scores[chosen]), "runner_up": url, "runner_up_cost": _finite(cost)}


def _finite(cost: float | None) -> float | None:
    """JSON has no infinity (a cost may be one)."""
    return cost if cost is None or math.isfinite(cost) else None

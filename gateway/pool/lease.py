"""The lease: one dispatch of one request to one replica, counted from acquisition until `close`
(idempotent), and what its outcome says about the replica. Admission (gateway/pool/admission.py)
makes leases and records their ends; the proxy and the jobs scheduler hold them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

from gateway.flow.service import Usage
from gateway.pool.replicas import ReplicaPool
from gateway.routing.replica import Outcome, Replica
from gateway.routing.request import Decision, RequestInfo

CLIENT_CLOSED = 499  # nginx's status for "client closed request", recorded in metrics only
TOO_MANY_REQUESTS = 429


class Issuer(Protocol):
    """What made a lease (Admission): its pool, and where its end is recorded."""

    pool: ReplicaPool

    def finish(self, lease: Lease, elapsed_s: float) -> None: ...


# What says the replica itself is unwell, whatever was asked of it (Envoy's gateway failures):
# the gateway's own 502/504 for connect errors, resets and timeouts, and a replica's 502/503/504.
GATEWAY_FAILURES = frozenset({502, 503, 504})


def outcome_of(code: int, count_5xx: bool = False) -> Outcome:
    """What a response says about the replica that gave it. A 429 is a refusal, not service (no
    latency sample, no reset of a failure streak); a client that left says nothing at all. Any
    other 5xx (a 500 above all) may be the request's own doing, input the replica could not
    handle, so by default it says nothing either: one client must not be able to get replicas
    ejected. `count_5xx` (outlier_detection.count_5xx) counts it as a failure."""
    if code in GATEWAY_FAILURES:
        return "failed"
    if code >= 500:
        return "failed" if count_5xx else "not_served"
    return "not_served" if code in (TOO_MANY_REQUESTS, CLIENT_CLOSED) else "served"


class DrainRate:
    """Completions per second over the last whole second (cheap enough for every release)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._second = int(clock())
        self._count = 0
        self._previous = 0

    def tick(self) -> None:
        self._roll()
        self._count += 1

    def per_second(self) -> float:
        self._roll()
        return float(max(self._previous, self._count))

    def _roll(self) -> None:
        second = int(self._clock())
        if second != self._second:
            self._previous = self._count if second == self._second + 1 else 0
            self._second, self._count = second, 0


class Lease:
    """One dispatch of one request to one replica, counted until `close` (which is idempotent).

    The holder sets `code` to the status the client got (499 while none), `broken` when the
    replica failed after its response began, and reports streamed progress; `key` names the API
    key and `model` the served model for metrics."""

    __slots__ = (
        "_admission", "_closed", "_started", "broken", "code", "decision", "key", "model",
        "remaining", "replica", "streamed", "tokens", "usage", "wants_usage",
    )  # fmt: skip

    def __init__(
        self,
        admission: Issuer,
        replica: Replica,
        request: RequestInfo,
        decision: Decision | None = None,
    ) -> None:
        self._admission = admission
        self.decision = decision or Decision(replica, "", "given")
        self._started = time.perf_counter()
        self._closed = False
        self.replica = replica
        self.tokens = request.tokens  # the request's estimated work
        self.remaining = request.tokens  # the part of it still counted against the replica
        self.code = CLIENT_CLOSED
        self.broken = False  # the replica failed after its response began (an SSE error event)
        self.key = ""
        self.model = request.model or ""
        self.streamed = 0  # stream events relayed (about one a token)
        self.wants_usage = False  # the relay looks for the response's usage (key limits)
        self.usage: Usage | None = None  # what the response said it used

    def progress(self, tokens: int) -> None:
        """Work done on the request while it is still outstanding (tokens streamed back)."""
        self.remaining -= tokens
        self._admission.pool.progress(self.replica, tokens)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._admission.finish(self, time.perf_counter() - self._started)

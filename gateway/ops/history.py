"""The status page's charts: a bounded ring of the gateway's recent state, one point every
INTERVAL_S over the last SPAN_S (2 s over 10 minutes: 300 points), served in /ui/status.json.

A point holds the requests finished per second since the previous point and their P50/P99, the
requests waiting at the gateway by flow-control class, the requests outstanding per replica, and
the prefix cache hit rate over the interval as the replicas report it (prompt tokens served from
their cache over those looked up, summed over replicas, from their load reports: our replica
sends them, the engines' metrics do not, and then the rate is null).

No timer of its own: the first event after a point falls due takes it, a lease's end
(GatewayMetrics.lease_closed) or a read of the status page (`tick`). So a busy gateway records
itself and an open page samples an idle one every INTERVAL_S; while nobody sends nor watches,
nothing is recorded and the page shows that stretch as a gap. Per request: a counter, an append
to a bounded list and a clock read; a point costs O(replicas + classes), at most once per
INTERVAL_S. Memory: SPAN_S / INTERVAL_S points of the pool's size, plus MAX_DURATIONS floats.

With `workers: N` each worker keeps its own: the rate, latencies and queue are that worker's;
the outstanding counts are the whole gateway's (the shared counts, as the status table's); the
cache hit rate is the replicas' own, whoever sent them the traffic.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from gateway.flow.queue import JOBS
from gateway.ops.flow_metrics import ALL_CLASSES
from gateway.ops.recent import quantile
from gateway.pool.admission import Admission
from gateway.pool.replicas import ReplicaPool
from gateway.routing.replica import Replica

INTERVAL_S = 2.0
SPAN_S = 600.0
# Latencies kept per interval for its P50/P99: past this (2,048 requests a second), the newest.
MAX_DURATIONS = 4096
GAP_INTERVALS = 2.5  # points further apart than this many intervals are drawn unjoined


@dataclass(frozen=True)
class Gauges:
    """What a point reads of the gateway as it is taken."""

    outstanding: dict[str, int]  # replica URL -> requests outstanding there
    queued: dict[str, int]  # class -> requests waiting at the gateway
    cache: dict[str, tuple[float, float]]  # replica URL -> (hit, queried) tokens since it started


@dataclass(frozen=True)
class Point:
    at: float  # the history's clock
    requests_per_s: float
    p50_s: float | None
    p99_s: float | None
    queued: dict[str, int]
    outstanding: dict[str, int]
    cache_hit_rate: float | None


def read_gauges(pool: ReplicaPool, admission: Admission) -> Gauges:
    replicas = pool.all()
    return Gauges(
        outstanding={r.url: r.busy for r in replicas},
        queued=queued_by_class(admission),
        cache={r.url: counts for r in replicas if (counts := cache_counts(r)) is not None},
    )


def queued_by_class(admission: Admission) -> dict[str, int]:
    """Every configured class (0 when none waits), `jobs` while deferred jobs wait; `all`
    without flow control."""
    flow = admission.rules.flow
    names = [c.name for c in flow.classes] if flow is not None else []
    queued = dict.fromkeys(names or [ALL_CLASSES], 0)
    for (rank, _), count in admission.waiting().items():
        name = ALL_CLASSES if flow is None else names[rank] if rank < len(names) else JOBS
        queued[name] = queued.get(name, 0) + count
    return queued


def cache_counts(replica: Replica) -> tuple[float, float] | None:
    report = replica.reported or {}
    if "prefix_cache_queried_tokens" not in report:
        return None
    return report.get("prefix_cache_hit_tokens", 0.0), report["prefix_cache_queried_tokens"]


class History:
    def __init__(
        self,
        read: Callable[[], Gauges],
        *,
        interval_s: float = INTERVAL_S,
        span_s: float = SPAN_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._read, self._clock = read, clock
        self.interval_s, self.span_s = interval_s, span_s
        self._points: deque[Point] = deque(maxlen=round(span_s / interval_s))
        self._count = 0
        self._durations: deque[float] = deque(maxlen=MAX_DURATIONS)
        self._since = clock()
        self._cache: dict[str, tuple[float, float]] = {}  # the counts at the last point

    def finished(self, duration_s: float) -> None:
        """A request's end (each attempt's, as the latency metrics count them)."""
        self._count += 1
        self._durations.append(duration_s)
        self.tick()

    def tick(self) -> None:
        """Take a point if one is due."""
        now = self._clock()
        if now - self._since >= self.interval_s:
            self._take(now)

    def _take(self, now: float) -> None:
        gauges = self._read()
        durations = sorted(self._durations)
        self._points.append(
            Point(
                now,
                self._count / (now - self._since),
                quantile(durations, 0.50),
                quantile(durations, 0.99),
                gauges.queued,
                gauges.outstanding,
                self._hit_rate(gauges),
            )
        )
        self._count, self._since = 0, now
        self._durations.clear()

    def _hit_rate(self, gauges: Gauges) -> float | None:
        """Tokens hit over tokens looked up since the last point, over the replicas that
        report them; a replica seen for the first time counts from now, one whose counts went
        down (it restarted) from zero."""
        hit = queried = 0.0
        for url, (h, q) in gauges.cache.items():
            last_h, last_q = self._cache.get(url, (h, q))
            if q < last_q or h < last_h:
                last_h = last_q = 0.0
            hit, queried = hit + h - last_h, queried + q - last_q
        kept = {url: c for url, c in self._cache.items() if url in gauges.outstanding}
        self._cache = kept | gauges.cache  # a replica silent for now keeps its last counts
        return hit / queried if queried > 0 else None

    def as_json(self) -> dict[str, Any]:
        """Columns, oldest first: `t_s` is each point's time in seconds before now (<= 0); a
        class or replica missing from a point is null there."""
        now = self._clock()
        points = [p for p in self._points if now - p.at <= self.span_s]
        classes = {name: None for p in points for name in p.queued}
        replicas = {url: None for p in points for url in p.outstanding}
        return {
            "interval_s": self.interval_s,
            "span_s": self.span_s,
            "gap_s": self.interval_s * GAP_INTERVALS,
            "t_s": [round(p.at - now, 2) for p in points],
            "requests_per_s": [round(p.requests_per_s, 3) for p in points],
            "p50_s": [p.p50_s for p in points],
            "p99_s": [p.p99_s for p in points],
            "queued": {name: [p.queued.get(name) for p in points] for name in classes},
            "outstanding": {url: [p.outstanding.get(url) for p in points] for url in replicas},
            "cache_hit_rate": [_rounded(p.cache_hit_rate) for p in points],
        }


def _rounded(share: float | None) -> float | None:
    return None if share is None else round(share, 4)

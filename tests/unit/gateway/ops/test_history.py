"""The status page's history: a point once an interval is due (not before), exact rates and
percentiles per interval, the replicas' cache hit rate from the change in their counts, and a
ring bounded by span / interval. Clock and gauges are injected."""

from __future__ import annotations

from gateway.ops.history import Gauges, History

A, B = "http://a:1", "http://b:1"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Gateway:
    """What the history reads as it takes a point; the test sets it."""

    def __init__(self) -> None:
        self.gauges = Gauges(outstanding={A: 0}, queued={"all": 0}, cache={})

    def __call__(self) -> Gauges:
        return self.gauges


def _history(interval_s: float = 2.0, span_s: float = 600.0) -> tuple[History, Clock, Gateway]:
    clock, gateway = Clock(), Gateway()
    return History(gateway, interval_s=interval_s, span_s=span_s, clock=clock), clock, gateway


def test_a_point_is_taken_by_the_first_event_once_due_with_that_intervals_figures() -> None:
    history, clock, _ = _history()
    for i in range(100):  # 100 requests over 1 s, 1 ms .. 100 ms: none due yet
        clock.now += 0.01
        history.finished((i + 1) / 1000)
    assert history.as_json()["t_s"] == []
    clock.now = 1002.0
    history.tick()  # a read of the page, 2 s after the start
    clock.now += 0.5
    document = history.as_json()
    assert document["t_s"] == [-0.5]
    assert document["requests_per_s"] == [50.0]  # 100 over 2 s
    assert (document["p50_s"], document["p99_s"]) == ([0.051], [0.1])
    clock.now += 2.0
    history.tick()  # nothing ended since: a rate of 0, no percentiles
    assert history.as_json()["requests_per_s"] == [50.0, 0.0]
    assert history.as_json()["p99_s"] == [0.1, None]


def test_gauges_become_columns_with_nulls_where_a_replica_or_class_was_absent() -> None:
    history, clock, gateway = _history()
    clock.now += 2
    history.tick()
    gateway.gauges = Gauges(outstanding={B: 3}, queued={"all": 0, "jobs": 2}, cache={})
    clock.now += 2
    history.tick()
    document = history.as_json()
    assert document["outstanding"] == {A: [0, None], B: [None, 3]}
    assert document["queued"] == {"all": [0, 0], "jobs": [None, 2]}


def test_cache_hit_rate_is_the_change_in_the_replicas_counts_over_the_interval() -> None:
    history, clock, gateway = _history()

    def point(outstanding: dict[str, int], cache: dict[str, tuple[float, float]]) -> None:
        gateway.gauges = Gauges(outstanding, {"all": 0}, cache)
        clock.now += 2
        history.tick()

    both = {A: 0, B: 0}
    point(both, {A: (900, 1000)})  # first seen: counts from here (its past is not this span)
    point(both, {A: (930, 1100)})  # 30 of 100
    point(both, {A: (930, 1100), B: (50, 50)})  # B counts from here; A looked nothing up
    point(both, {A: (10, 100), B: (140, 150)})  # A restarted: 10 of 100; B 90 of 100
    point(both, {B: (140, 150)})  # A silent: it keeps its counts
    point(both, {A: (60, 200), B: (140, 150)})  # 50 of 100
    point({B: 0}, {B: (150, 160)})  # A left the pool: forgotten ...
    point(both, {A: (60, 200), B: (150, 160)})  # ... so it counts from here again
    rates = history.as_json()["cache_hit_rate"]
    assert rates == [None, 0.3, None, 0.5, None, 0.5, 1.0, None]


def test_the_ring_keeps_span_over_interval_points_and_only_those_within_the_span() -> None:
    history, clock, _ = _history(interval_s=1.0, span_s=10.0)
    for _ in range(25):
        clock.now += 1
        history.finished(0.01)  # each request ends an interval
    document = history.as_json()
    assert document["t_s"] == [float(-i) for i in range(9, -1, -1)]
    assert document["gap_s"] == 2.5
    clock.now += 5  # nothing since: the older half has left the span
    assert history.as_json()["t_s"] == [float(-i) for i in range(10, 4, -1)]

"""The status page's recent-traffic windows: exact rate and percentiles over the window, with
an injected clock."""

from __future__ import annotations

from gateway.ops.recent import RecentTraffic


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_rate_and_percentiles_cover_only_the_window() -> None:
    clock = Clock()
    recent = RecentTraffic(window_s=10.0, size=1000, clock=clock)
    for i in range(100):  # 100 requests in the first 10 s, 1 ms .. 100 ms
        clock.now += 0.1
        recent.add("a", (i + 1) / 1000)
    summary = recent.summary("a")
    assert summary["requests_per_s"] == 10.0
    assert (summary["p50_s"], summary["p99_s"]) == (0.051, 0.1)
    clock.now += 20  # all of it has left the window
    assert recent.summary()["requests_per_s"] == 0.0 and recent.summary()["p99_s"] is None


def test_a_full_ring_reports_over_its_own_span() -> None:
    clock = Clock()
    recent = RecentTraffic(window_s=10.0, size=50, clock=clock)
    clock.now += 10
    for _ in range(200):  # 1000/s: the ring of 50 covers 50 ms, not the 10 s window
        clock.now += 0.001
        recent.add("a", 0.002)
    assert round(recent.summary("a")["requests_per_s"]) == 1020  # 50 samples over 49 ms


def test_replicas_that_left_are_forgotten() -> None:
    recent = RecentTraffic()
    recent.add("a", 0.1)
    recent.add("b", 0.1)
    recent.keep_only(["b"])
    assert recent.summary("a")["p50_s"] is None
    assert recent.summary("b")["p50_s"] == 0.1
    assert recent.summary()["p50_s"] == 0.1

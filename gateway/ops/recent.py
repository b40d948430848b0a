"""Recent traffic for the status page (/ui): request rate and latency percentiles over the last
window_s seconds, per replica and for the whole gateway.

Each finished request appends one (time, duration) pair to a bounded ring, O(1) on the request
path, and drops the samples that have aged out of the window as it writes; the percentiles are
computed only when the page asks. Under a rate that fills the ring faster than window_s, the
figures cover the ring's span instead (still exact for that span). The windows of replicas that
left the pool are dropped by GatewayMetrics.forget_gone (`keep_only`).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

TOTAL = ""  # key of the gateway-wide window


class RecentWindow:
    def __init__(
        self, window_s: float, size: int, clock: Callable[[], float], since: float
    ) -> None:
        self._samples: deque[tuple[float, float]] = deque(maxlen=size)
        self._window_s = window_s
        self._clock = clock
        self._since = since  # when counting began: a young gateway's rate is over its age

    def add(self, duration_s: float) -> None:
        now = self._clock()
        samples = self._samples
        while samples and samples[0][0] < now - self._window_s:
            samples.popleft()
        samples.append((now, duration_s))

    def summary(self) -> dict[str, Any]:
        now = self._clock()
        cutoff = now - self._window_s
        durations = sorted(d for t, d in self._samples if t >= cutoff)
        span = min(self._window_s, now - self._since)
        if len(self._samples) == self._samples.maxlen and self._samples[0][0] > cutoff:
            span = now - self._samples[0][0]  # the ring is full: it covers less than the window
        return {
            "requests_per_s": len(durations) / span if span > 0 else 0.0,
            "p50_s": quantile(durations, 0.50),
            "p99_s": quantile(durations, 0.99),
            "window_s": round(span, 3),
        }


def quantile(ordered: list[float], q: float) -> float | None:
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class RecentTraffic:
    def __init__(
        self, window_s: float = 30.0, size: int = 2048, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._windows: dict[str, RecentWindow] = {}
        self._window_s, self._size, self._clock = window_s, size, clock
        self._since = clock()
        self._total = self._windows[TOTAL] = self._make()

    def _make(self) -> RecentWindow:
        return RecentWindow(self._window_s, self._size, self._clock, self._since)

    def add(self, replica: str, duration_s: float) -> None:
        window = self._windows.get(replica)
        if window is None:
            window = self._windows[replica] = self._make()
        window.add(duration_s)
        self._total.add(duration_s)

    def summary(self, replica: str = TOTAL) -> dict[str, Any]:
        window = self._windows.get(replica)
        return (window or self._make()).summary()

    def replicas(self) -> list[str]:
        return [url for url in self._windows if url != TOTAL]

    def keep_only(self, replicas: Iterable[str]) -> None:
        """Forget replicas that left the pool, so the windows stay bounded by the pool."""
        keep = {TOTAL, *replicas}
        for url in [url for url in self._windows if url not in keep]:
            del self._windows[url]

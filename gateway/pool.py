"""The replica pool: the one owner of per-replica state (outstanding count, health, ejection,
totals).

The request path brackets each dispatch with acquire/release in one try/finally, so the
outstanding count covers a request from dispatch until its response is fully relayed, the
upstream fails, or the client goes away. The pool outlives config reloads: a reload hands it
the new replica list, replicas that stay keep their counts, and removed ones drain (they take
no new requests and disappear once their last request ends).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(eq=False)
class Replica:
    url: str
    healthy: bool = True
    draining: bool = False
    outstanding: int = 0
    requests_total: int = 0
    errors_total: int = 0
    consecutive_failures: int = 0
    ejections: int = 0  # times ejected by outlier detection; the back-off grows with it
    ejected_until: float = 0.0  # monotonic clock; 0 when not ejected

    def as_json(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "healthy": self.healthy,
            "draining": self.draining,
            "ejected": self.ejected_until > 0,
            "outstanding": self.outstanding,
            "requests_total": self.requests_total,
            "errors_total": self.errors_total,
            "ejections_total": self.ejections,
        }


class ReplicaPool:
    def __init__(self, urls: Iterable[str], clock: Callable[[], float] = time.monotonic) -> None:
        self._active: dict[str, Replica] = {url: Replica(url) for url in urls}
        self._draining: dict[str, Replica] = {}
        self._available: tuple[Replica, ...] | None = None
        self._clock = clock
        self._ejected = 0
        self.outstanding = 0  # over every replica, draining ones included

    def available(self) -> Sequence[Replica]:
        """Replicas a policy may choose from: configured, healthy, not draining, not ejected."""
        if self._ejected:
            self._return_ejected()
        if self._available is None:
            self._available = tuple(
                r for r in self._active.values() if r.healthy and not r.ejected_until
            )
        return self._available

    def all(self) -> list[Replica]:
        return [*self._active.values(), *self._draining.values()]

    def active(self) -> list[Replica]:
        return list(self._active.values())

    def get(self, url: str) -> Replica | None:
        return self._active.get(url)

    def update(self, urls: Sequence[str]) -> None:
        """Swap in a new replica list; kept replicas keep their state, removed ones drain."""
        active: dict[str, Replica] = {}
        for url in urls:
            replica = self._active.get(url) or self._draining.pop(url, None) or Replica(url)
            replica.draining = False
            active[url] = replica
        for url, replica in self._active.items():
            if url not in active and replica.outstanding > 0:
                replica.draining = True
                self._draining[url] = replica
        self._active = active
        self._ejected = sum(1 for r in active.values() if r.ejected_until)
        self._available = None

    def set_healthy(self, replica: Replica, healthy: bool) -> None:
        if replica.healthy != healthy:
            replica.healthy = healthy
            self._available = None

    def eject(self, replica: Replica, duration_s: float) -> None:
        if not replica.ejected_until:
            self._ejected += 1
        replica.ejections += 1
        replica.ejected_until = self._clock() + duration_s
        self._available = None

    def ejected_count(self) -> int:
        return self._ejected

    def is_ejected(self, replica: Replica) -> bool:
        return replica.ejected_until > self._clock()

    def acquire(self, replica: Replica) -> None:
        replica.outstanding += 1
        replica.requests_total += 1
        self.outstanding += 1

    def release(self, replica: Replica, *, failed: bool = False) -> None:
        replica.outstanding -= 1
        self.outstanding -= 1
        if failed:
            replica.errors_total += 1
            replica.consecutive_failures += 1
        else:
            replica.consecutive_failures = 0
        if replica.draining and replica.outstanding == 0:
            self._draining.pop(replica.url, None)

    def _return_ejected(self) -> None:
        now = self._clock()
        for replica in self._active.values():
            if replica.ejected_until and replica.ejected_until <= now:
                replica.ejected_until = 0.0
                replica.consecutive_failures = 0
                self._ejected -= 1
                self._available = None

"""Admission: which replica a request may be dispatched to now, or how long it must wait.

With no limits configured this is the policy's choice over the available replicas. With
`limits.max_outstanding_per_replica`, a replica's own `max_concurrency`, or
`limits.max_outstanding`, a request that finds no free slot waits in one FIFO queue at the
gateway (a central queue: it goes to the first replica that frees a slot) for up to
`queue_timeout_s`; when the queue is full it gets a fast 429 whose Retry-After comes from the
rate at which requests are completing now.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable, Collection, Sequence

from gateway.config import Limits
from gateway.errors import NoHealthyReplica, Overloaded
from gateway.policies import NO_INFO, Policy, RequestInfo
from gateway.pool import Replica, ReplicaPool

_NO_LIMIT = 1 << 62


class NoUntriedReplica(Exception):
    """Every available replica was already tried by this request."""


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


class Admission:
    def __init__(self, pool: ReplicaPool, clock: Callable[[], float] = time.monotonic) -> None:
        self._pool = pool
        self._waiters: deque[asyncio.Future[None]] = deque()
        self.drain = DrainRate(clock)

    @property
    def queued(self) -> int:
        return len(self._waiters)

    def retry_after_s(self) -> int:
        rate = self.drain.per_second()
        return 1 if rate <= 0 else max(1, min(60, math.ceil((self.queued + 1) / rate)))

    async def acquire(
        self,
        policy: Policy,
        limits: Limits,
        exclude: Collection[Replica] = (),
        request: RequestInfo = NO_INFO,
    ) -> Replica:
        """A replica with a free slot, counted as dispatched (with the request's estimated
        tokens); waits in the queue if need be."""
        if not self._waiters:
            replica = self._try(policy, limits, exclude, request)
            if replica is not None:
                return replica
        if self.queued >= limits.max_queue:
            raise self._overloaded("every replica is at its limit and the gateway queue is full")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limits.queue_timeout_s
        front = False
        while True:
            waiter = loop.create_future()
            (self._waiters.appendleft if front else self._waiters.append)(waiter)
            try:
                async with asyncio.timeout_at(deadline):
                    await waiter
            except TimeoutError:
                raise self._overloaded(
                    f"no replica slot freed within limits.queue_timeout_s = "
                    f"{limits.queue_timeout_s} s"
                ) from None
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
            replica = self._try(policy, limits, exclude, request)
            if replica is not None:
                self._wake_next(limits)  # more than one slot may be free
                return replica
            front = True  # woken but beaten to the slot: keep our place

    def release(self, replica: Replica, *, failed: bool, limits: Limits, tokens: int = 0) -> None:
        self._pool.release(replica, failed=failed, tokens=tokens)
        self.drain.tick()
        self._wake_next(limits)

    def _wake_next(self, limits: Limits) -> None:
        if self._waiters and self._has_free_slot(limits):
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)

    def _has_free_slot(self, limits: Limits) -> bool:
        return bool(self._free(limits, ()))

    def _try(
        self,
        policy: Policy,
        limits: Limits,
        exclude: Collection[Replica],
        request: RequestInfo,
    ) -> Replica | None:
        free = self._free(limits, exclude)
        if not free:
            return None
        replica = policy.choose(free, request)
        self._pool.acquire(replica, request.tokens)
        return replica

    def _free(self, limits: Limits, exclude: Collection[Replica]) -> Sequence[Replica]:
        available = self._pool.available()
        if not available:
            raise NoHealthyReplica("no healthy replica to route to; see /admin/replicas")
        candidates = [r for r in available if r not in exclude] if exclude else available
        if not candidates:
            raise NoUntriedReplica
        if limits.max_outstanding is not None and self._pool.outstanding >= limits.max_outstanding:
            return ()
        per_replica = limits.max_outstanding_per_replica
        if per_replica is None and not self._pool.replica_limits:
            return candidates
        default = per_replica or _NO_LIMIT
        return [r for r in candidates if r.outstanding < (r.max_concurrency or default)]

    def _overloaded(self, message: str) -> Overloaded:
        return Overloaded(message, headers={"Retry-After": str(self.retry_after_s())})

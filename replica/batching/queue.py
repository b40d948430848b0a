"""The bounded request queue every batcher owns: admission (429), queue timeout (503), FIFO order.

`RequestQueue.submit` is the one place a request waits before dispatch; it times itself out,
so a busy forward pass never delays a queue-timeout error.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from replica.batching.clock import Clock
from replica.batching.observer import BatchObserver
from replica.errors import BatcherClosed, QueueFull, QueueTimeout

T = TypeVar("T")
R = TypeVar("R")


@dataclass(eq=False)
class Pending(Generic[T, R]):
    item: T
    enqueued_at_s: float
    future: asyncio.Future[R]
    dispatched: asyncio.Event = field(default_factory=asyncio.Event)


class RequestQueue(Generic[T, R]):
    def __init__(
        self, *, max_queue: int, queue_timeout_s: float, clock: Clock, observer: BatchObserver
    ) -> None:
        self._items: deque[Pending[T, R]] = deque()
        self._max_queue = max_queue
        self._timeout_s = queue_timeout_s
        self._clock = clock
        self._observer = observer
        self.changed = asyncio.Event()
        self.closed = False

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[Pending[T, R]]:
        return iter(self._items)

    def oldest_enqueued_at(self) -> float | None:
        return self._items[0].enqueued_at_s if self._items else None

    def _put(self, item: T) -> Pending[T, R]:
        if self.closed:
            raise BatcherClosed("the replica is shutting down")
        if len(self._items) >= self._max_queue:
            self._observer.on_reject("queue_full")
            raise QueueFull(f"queue is full ({self._max_queue} requests waiting); retry later")
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        pending = Pending(item, self._clock.now(), future)
        self._items.append(pending)
        self.changed.set()
        return pending

    async def submit(self, item: T) -> R:
        pending = self._put(item)
        try:
            deadline = pending.enqueued_at_s + self._timeout_s
            if not await self._clock.wait(pending.dispatched, deadline):
                self._discard(pending)
                self._observer.on_reject("queue_timeout")
                raise QueueTimeout(
                    f"request waited {self._timeout_s * 1000:.0f} ms in the queue; retry later"
                )
            return await pending.future
        except asyncio.CancelledError:
            self._discard(pending)  # the client went away; batchers skip done futures
            pending.future.cancel()
            raise

    def _discard(self, pending: Pending[T, R]) -> None:
        if pending in self._items:
            self._items.remove(pending)
            self.changed.set()

    def take(self, n: int) -> list[Pending[T, R]]:
        """Pop up to n requests for dispatch, oldest first."""
        now = self._clock.now()
        batch = [self._items.popleft() for _ in range(min(n, len(self._items)))]
        for pending in batch:
            pending.dispatched.set()
            self._observer.on_dispatch(now - pending.enqueued_at_s)
        return batch

    def peek(self) -> Pending[T, R] | None:
        return self._items[0] if self._items else None

    async def wait_for(self, count: int, deadline: float | None) -> bool:
        """Wait until at least `count` requests are queued (True) or the deadline passes."""
        while len(self._items) < count:
            if self.closed:
                return False
            self.changed.clear()
            if not await self._clock.wait(self.changed, deadline):
                return len(self._items) >= count
        return True

    def close(self) -> None:
        """Refuse new requests and fail the queued ones."""
        self.closed = True
        while self._items:
            pending = self._items.popleft()
            if not pending.future.done():
                pending.future.set_exception(BatcherClosed("the replica is shutting down"))
            pending.dispatched.set()
        self.changed.set()

"""The bounded request queue every batcher owns: admission (429), queue timeout (503), FIFO order.

`RequestQueue.submit` is the one place a request waits before dispatch; it times itself out,
so a busy forward pass never delays a queue-timeout error. Requests are put and waited for on
the event loop; the continuous batcher takes them on its forward thread (`take_head_if`), so
the line itself is guarded by a lock, held only for a deque operation.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from replica.batching.clock import Clock
from replica.batching.observer import BatchObserver
from replica.errors import BatcherClosed, QueueFull, QueueTimeout

T = TypeVar("T")
R = TypeVar("R")
A = TypeVar("A")


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
        self._lock = threading.Lock()
        self._max_queue = max_queue
        self._timeout_s = queue_timeout_s
        self._clock = clock
        self._observer = observer
        self.changed = asyncio.Event()
        self.closed = False

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[Pending[T, R]]:
        with self._lock:
            return iter(list(self._items))

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
        with self._lock:
            self._items.append(pending)
        self.changed.set()
        return pending

    async def submit(self, item: T) -> R:
        pending = self._put(item)
        try:
            deadline = pending.enqueued_at_s + self._timeout_s
            dispatched = await self._clock.wait(pending.dispatched, deadline)
            if not dispatched and self._discard(pending):  # (not taken just as time ran out)
                self._observer.on_reject("queue_timeout")
                raise QueueTimeout(
                    f"request waited {self._timeout_s * 1000:.0f} ms in the queue; retry later"
                )
            return await pending.future
        except asyncio.CancelledError:
            self._discard(pending)  # the client went away; batchers skip done futures
            pending.future.cancel()
            raise

    def _discard(self, pending: Pending[T, R]) -> bool:
        """Take `pending` out of the line; False when a batcher had already taken it."""
        with self._lock:
            if pending not in self._items:
                return False
            self._items.remove(pending)
        self.changed.set()
        return True

    def take(self, n: int) -> list[Pending[T, R]]:
        """Pop up to n requests for dispatch, oldest first."""
        with self._lock:
            batch = [self._items.popleft() for _ in range(min(n, len(self._items)))]
        for pending in batch:
            self._dispatched(pending)
        return batch

    def take_head_if(self, admit: Callable[[T], A | None]) -> tuple[Pending[T, R], A] | None:
        """From any thread: pop the oldest request if `admit(item)` lets it start (anything
        but None), with what `admit` said. Its waiter learns it was dispatched on the event
        loop, in the loop's next turn."""
        with self._lock:
            if not self._items:
                return None
            admitted = admit(self._items[0].item)
            if admitted is None:
                return None
            pending = self._items.popleft()
        pending.future.get_loop().call_soon_threadsafe(self._dispatched, pending)
        return pending, admitted

    def _dispatched(self, pending: Pending[T, R]) -> None:
        pending.dispatched.set()
        self._observer.on_dispatch(self._clock.now() - pending.enqueued_at_s)

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
        with self._lock:
            failed = list(self._items)
            self._items.clear()
        for pending in failed:
            if not pending.future.done():
                pending.future.set_exception(BatcherClosed("the replica is shutting down"))
            pending.dispatched.set()
        self.changed.set()

"""`static` batcher: the bus leaves only when exactly `batch_size` requests are aboard.

`max_wait_ms` (optional) bounds starvation: measured from the oldest queued request's arrival,
after which whatever is queued goes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from replica.batching.base import RequestBatcher
from replica.batching.queue import Pending

T = TypeVar("T")
R = TypeVar("R")


class StaticBatcher(RequestBatcher[T, R]):
    def __init__(
        self,
        forward: Callable[[Sequence[T]], Sequence[R]],
        *,
        batch_size: int,
        max_wait_s: float | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(forward, **kwargs)
        self.capacity = batch_size
        self._max_wait_s = max_wait_s

    async def _collect(self) -> list[Pending[T, R]]:
        await self._queue.wait_for(1, None)
        oldest = self._queue.oldest_enqueued_at()
        deadline = None if self._max_wait_s is None or oldest is None else oldest + self._max_wait_s
        await self._queue.wait_for(self.capacity, deadline)
        return self._queue.take(self.capacity)

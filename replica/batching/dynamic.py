"""`dynamic` batcher: dispatch when `max_batch_size` are queued or the window closes.

The window opens at the oldest queued request's arrival, so requests that queued up during a
forward pass whose window already closed go at once, and a queue still holding
>= max_batch_size after a forward pass dispatches the next batch back-to-back.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from replica.batching.base import RequestBatcher
from replica.batching.queue import Pending

T = TypeVar("T")
R = TypeVar("R")


class DynamicBatcher(RequestBatcher[T, R]):
    def __init__(
        self,
        forward: Callable[[Sequence[T]], Sequence[R]],
        *,
        max_batch_size: int,
        max_wait_s: float,
        **kwargs: Any,
    ) -> None:
        super().__init__(forward, **kwargs)
        self.capacity = max_batch_size
        self._max_wait_s = max_wait_s

    async def _collect(self) -> list[Pending[T, R]]:
        await self._queue.wait_for(1, None)
        oldest = self._queue.oldest_enqueued_at()
        if oldest is not None:
            await self._queue.wait_for(self.capacity, oldest + self._max_wait_s)
        return self._queue.take(self.capacity)

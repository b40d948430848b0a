"""`none` batcher: one request per forward pass, in arrival order (the baseline)."""

from __future__ import annotations

from typing import TypeVar

from replica.batching.base import RequestBatcher
from replica.batching.queue import Pending

T = TypeVar("T")
R = TypeVar("R")


class NoBatcher(RequestBatcher[T, R]):
    capacity = 1

    async def _collect(self) -> list[Pending[T, R]]:
        await self._queue.wait_for(1, None)
        return self._queue.take(1)

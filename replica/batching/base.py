"""The batcher interface and the request-level base shared by `none`, `static` and `dynamic`.

A request-level batcher owns a `RequestQueue` and one background task: collect a batch
(the subclass's policy), run it off the event loop, resolve each request's future.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from replica.batching.clock import Clock, LoopClock
from replica.batching.observer import BatchObserver, NullObserver
from replica.batching.queue import Pending, RequestQueue

T = TypeVar("T")
R = TypeVar("R")
T_contra = TypeVar("T_contra", contravariant=True)
R_co = TypeVar("R_co", covariant=True)


@dataclass(frozen=True)
class Load:
    queued: int
    running: int
    capacity: int
    backlog_tokens: int = 0  # tokens still to generate for queued and running sequences
    kv_usage: float = 0.0  # share of KV blocks held by sequences (continuous batcher), 0-1


class Batcher(Protocol[T_contra, R_co]):
    async def submit(self, item: T_contra) -> R_co: ...

    async def close(self) -> None: ...

    def load(self) -> Load: ...


@dataclass(frozen=True)
class QueueKnobs:
    max_queue: int = 256
    queue_timeout_s: float = 30.0


DEFAULT_KNOBS = QueueKnobs()


class RequestBatcher(Generic[T, R]):
    """Runs `forward(items) -> results` (same order) on whole batches chosen by `_collect`."""

    capacity = 1

    def __init__(
        self,
        forward: Callable[[Sequence[T]], Sequence[R]],
        *,
        executor: Executor,
        knobs: QueueKnobs = DEFAULT_KNOBS,
        clock: Clock | None = None,
        observer: BatchObserver | None = None,
    ) -> None:
        self._forward = forward
        self._executor = executor
        self._clock = clock or LoopClock()
        self._observer = observer or NullObserver()
        self._queue: RequestQueue[T, R] = RequestQueue(
            max_queue=knobs.max_queue,
            queue_timeout_s=knobs.queue_timeout_s,
            clock=self._clock,
            observer=self._observer,
        )
        self._task: asyncio.Task[None] | None = None
        self._running = 0

    async def submit(self, item: T) -> R:
        if self._task is None and not self._queue.closed:
            self._task = asyncio.create_task(self._loop(), name=type(self).__name__)
        return await self._queue.submit(item)

    def load(self) -> Load:
        return Load(queued=len(self._queue), running=self._running, capacity=self.capacity)

    async def close(self) -> None:
        """Fail queued requests, let the batch in flight finish, stop the task."""
        self._queue.close()
        if self._task is not None:
            await self._task

    async def _collect(self) -> list[Pending[T, R]]:
        raise NotImplementedError

    async def _loop(self) -> None:
        while not self._queue.closed:
            batch = await self._collect()
            if batch:
                await self._run(batch)

    async def _run(self, batch: list[Pending[T, R]]) -> None:
        live = [p for p in batch if not p.future.done()]
        if not live:
            return
        self._running = len(live)
        started = time.perf_counter()
        loop = asyncio.get_running_loop()
        try:
            results = await loop.run_in_executor(
                self._executor, self._forward, [p.item for p in live]
            )
        except Exception as error:  # a failed forward pass fails its batch, not the replica
            for pending in live:
                if not pending.future.done():
                    pending.future.set_exception(error)
        else:
            for pending, result in zip(live, results, strict=True):
                if not pending.future.done():
                    pending.future.set_result(result)
        finally:
            self._running = 0
            self._observer.on_batch(len(live), time.perf_counter() - started)

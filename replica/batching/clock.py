"""Clocks for batchers: the real one waits on `loop.time()` deadlines; `FakeClock` is for tests.

Batchers never sleep in small steps: they wait for an event *or* a deadline, whichever is first.
"""

from __future__ import annotations

import asyncio
from typing import Any, Protocol


class Clock(Protocol):
    def now(self) -> float: ...

    async def wait(self, event: asyncio.Event, deadline: float | None) -> bool:
        """Wait until `event` is set (True) or `deadline` passes (False)."""
        ...


class LoopClock:
    def now(self) -> float:
        return asyncio.get_running_loop().time()

    async def wait(self, event: asyncio.Event, deadline: float | None) -> bool:
        if event.is_set():
            return True
        if deadline is None:
            await event.wait()
            return True
        try:
            async with asyncio.timeout_at(deadline):
                await event.wait()
        except TimeoutError:
            return event.is_set()
        return True


class FakeClock:
    """Time moves only when a test calls `advance`; waiters whose deadline passed wake up."""

    def __init__(self, start_s: float = 0.0) -> None:
        self._now = start_s
        self._waiters: list[tuple[float, asyncio.Future[None]]] = []

    def now(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        self._now += seconds
        for deadline, waiter in list(self._waiters):
            if deadline <= self._now and not waiter.done():
                waiter.set_result(None)

    async def wait(self, event: asyncio.Event, deadline: float | None) -> bool:
        if event.is_set():
            return True
        if deadline is not None and deadline <= self._now:
            return False
        timer: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (float("inf") if deadline is None else deadline, timer)
        self._waiters.append(entry)
        setter = asyncio.ensure_future(event.wait())
        either: set[asyncio.Future[Any]] = {setter, timer}
        try:
            await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        finally:
            setter.cancel()
            self._waiters.remove(entry)
            timer.cancel()
        return event.is_set()

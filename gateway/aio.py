"""Waiting on an event for at most a while, without losing a cancel.

`asyncio.wait_for(event.wait(), t)` runs the wait in a task of its own; on Python 3.11, a cancel
that arrives in the same loop turn as the event is set is swallowed (wait_for returns the
result instead), so a background loop asked to stop goes on and its shutdown never ends.
`asyncio.timeout` waits in the caller's own task, where a cancel always reaches it.
"""

from __future__ import annotations

import asyncio


async def wait_set(event: asyncio.Event, timeout_s: float) -> bool:
    """Whether `event` is set within `timeout_s` seconds."""
    try:
        async with asyncio.timeout(timeout_s):
            await event.wait()
    except TimeoutError:
        return event.is_set()
    return True

"""wait_set: a cancel that arrives in the loop turn the event is set is never lost (with
asyncio.wait_for on Python 3.11 it was, and the jobs scheduler then never stopped)."""

from __future__ import annotations

import asyncio

import pytest

from gateway.aio import wait_set


@pytest.mark.parametrize("turns", [0, 1, 2])
async def test_a_cancel_before_the_waiter_ran_again_always_cancels(turns: int) -> None:
    """The event is set, `turns` loop turns pass, then a cancel: unless the wait had ended
    by then, it ends cancelled."""
    event = asyncio.Event()
    waiting = asyncio.create_task(wait_set(event, 10))
    await asyncio.sleep(0)  # it waits on the event now
    event.set()
    for _ in range(turns):
        await asyncio.sleep(0)
    if waiting.done():
        assert waiting.result() is True
        return
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting


async def test_it_says_whether_the_event_was_set_in_time() -> None:
    event = asyncio.Event()
    assert not await wait_set(event, 0.01)
    asyncio.get_running_loop().call_later(0.01, event.set)
    assert await wait_set(event, 5)

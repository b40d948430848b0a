"""Batcher dispatch rules, exact: inline forward passes and a fake clock, no real time."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from replica.batching import DynamicBatcher, NoBatcher, QueueKnobs, StaticBatcher
from replica.batching.clock import FakeClock
from replica.batching.observer import NullObserver
from replica.batching.queue import Pending, RequestQueue
from replica.batching.testing import InlineExecutor, RecordingForward
from replica.errors import BatcherClosed, QueueFull, QueueTimeout


async def settle() -> None:
    """Let every ready callback run (inline forward passes make this finite and exact)."""
    for _ in range(50):
        await asyncio.sleep(0)


def sizes(forward: RecordingForward) -> list[int]:
    return [len(b) for b in forward.batches]


def submit_many(batcher: Any, items: range) -> list[asyncio.Task[Any]]:
    return [asyncio.create_task(batcher.submit(i)) for i in items]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def common(clock: FakeClock, **knobs: Any) -> dict[str, Any]:
    return {"executor": InlineExecutor(), "clock": clock, "knobs": QueueKnobs(**knobs)}


async def test_none_runs_one_request_per_forward_pass(clock: FakeClock) -> None:
    forward = RecordingForward(lambda x: x * 10)
    batcher = NoBatcher(forward, **common(clock))
    results = await asyncio.gather(*submit_many(batcher, range(5)))
    assert results == [0, 10, 20, 30, 40]
    assert sizes(forward) == [1, 1, 1, 1, 1]
    await batcher.close()


async def test_static_holds_n_minus_1_until_the_nth_arrives(clock: FakeClock) -> None:
    forward = RecordingForward()
    batcher = StaticBatcher(forward, batch_size=4, **common(clock))
    first = submit_many(batcher, range(3))
    await settle()
    clock.advance(20)  # no starvation guard: time alone never sends a partial batch
    await settle()
    assert forward.batches == []
    assert batcher.load().queued == 3
    last = submit_many(batcher, range(3, 4))
    assert await asyncio.gather(*first, *last) == [0, 1, 2, 3]
    assert forward.batches == [[0, 1, 2, 3]]
    await batcher.close()


async def test_static_max_wait_sends_a_partial_batch(clock: FakeClock) -> None:
    forward = RecordingForward()
    batcher = StaticBatcher(forward, batch_size=4, max_wait_s=0.1, **common(clock))
    tasks = submit_many(batcher, range(2))
    await settle()
    clock.advance(0.099)
    await settle()
    assert forward.batches == []
    clock.advance(0.001)
    await asyncio.gather(*tasks)
    assert forward.batches == [[0, 1]]
    await batcher.close()


async def test_dynamic_dispatches_when_the_window_closes(clock: FakeClock) -> None:
    forward = RecordingForward()
    batcher = DynamicBatcher(forward, max_batch_size=8, max_wait_s=0.05, **common(clock))
    tasks = submit_many(batcher, range(2))
    await settle()
    clock.advance(0.03)
    tasks += submit_many(batcher, range(2, 3))  # joins the window opened by the first
    await settle()
    clock.advance(0.019)
    await settle()
    assert forward.batches == []
    clock.advance(0.001)
    await asyncio.gather(*tasks)
    assert forward.batches == [[0, 1, 2]]
    await batcher.close()


async def test_dynamic_dispatches_at_once_when_full(clock: FakeClock) -> None:
    forward = RecordingForward()
    batcher = DynamicBatcher(forward, max_batch_size=4, max_wait_s=10.0, **common(clock))
    assert await asyncio.gather(*submit_many(batcher, range(4))) == [0, 1, 2, 3]
    assert sizes(forward) == [4]
    assert clock.now() == 0.0
    await batcher.close()


async def test_dynamic_goes_back_to_back_while_queue_holds_a_full_batch(clock: FakeClock) -> None:
    forward = RecordingForward()
    batcher = DynamicBatcher(forward, max_batch_size=4, max_wait_s=10.0, **common(clock))
    tasks = submit_many(batcher, range(13))
    await settle()
    assert sizes(forward) == [4, 4, 4]  # no window waited between them
    assert batcher.load().queued == 1
    clock.advance(10.0)
    await asyncio.gather(*tasks)
    assert sizes(forward) == [4, 4, 4, 1]
    assert [x for b in forward.batches for x in b] == list(range(13))
    await batcher.close()


async def test_queue_full_raises_with_retry_after(clock: FakeClock) -> None:
    batcher = StaticBatcher(RecordingForward(), batch_size=8, **common(clock, max_queue=2))
    held = submit_many(batcher, range(2))
    await settle()
    with pytest.raises(QueueFull) as error:
        await batcher.submit(99)
    assert error.value.status == 429
    assert error.value.headers()["Retry-After"].isdigit()
    await batcher.close()
    for task in held:
        with pytest.raises(BatcherClosed):
            await task


async def test_queue_timeout_fails_the_waiting_request(clock: FakeClock) -> None:
    forward = RecordingForward()
    batcher = StaticBatcher(forward, batch_size=8, **common(clock, queue_timeout_s=1.0))
    task = asyncio.create_task(batcher.submit(1))
    await settle()
    clock.advance(1.0)
    with pytest.raises(QueueTimeout):
        await task
    assert batcher.load().queued == 0
    assert forward.batches == []
    await batcher.close()


async def test_failed_forward_pass_fails_its_batch_only(clock: FakeClock) -> None:
    forward = RecordingForward(fail=True)
    batcher = DynamicBatcher(forward, max_batch_size=2, max_wait_s=0.0, **common(clock))
    with pytest.raises(RuntimeError, match="forward pass failed"):
        await batcher.submit(1)
    forward.fail = False
    assert await batcher.submit(2) == 2
    await batcher.close()


async def test_cancelled_request_leaves_the_queue(clock: FakeClock) -> None:
    forward = RecordingForward()
    batcher = StaticBatcher(forward, batch_size=2, **common(clock))
    gone = asyncio.create_task(batcher.submit(1))
    await settle()
    gone.cancel()
    await settle()
    assert batcher.load().queued == 0
    assert await asyncio.gather(*submit_many(batcher, range(2, 4))) == [2, 3]
    assert forward.batches == [[2, 3]]
    await batcher.close()


async def test_close_refuses_new_requests(clock: FakeClock) -> None:
    batcher = NoBatcher(RecordingForward(), **common(clock))
    await batcher.close()
    with pytest.raises(BatcherClosed):
        await batcher.submit(1)


class _DeadlineAsTaken(FakeClock):
    """A request's queue deadline passes in the very instant a batcher on another thread takes
    it: `hook` runs (the take), then the wait reports the deadline."""

    def __init__(self) -> None:
        super().__init__()
        self.hook: Any = None

    async def wait(self, event: asyncio.Event, deadline: float | None) -> bool:
        if deadline is not None and self.hook is not None:
            self.hook()
            return event.is_set()
        return await super().wait(event, deadline)


async def test_a_request_taken_as_its_queue_deadline_passes_is_served_not_timed_out() -> None:
    clock = _DeadlineAsTaken()
    queue: RequestQueue[int, str] = RequestQueue(
        max_queue=4, queue_timeout_s=1.0, clock=clock, observer=NullObserver()
    )
    taken: list[tuple[Pending[int, str], bool]] = []
    clock.hook = lambda: taken.append(queue.take_head_if(lambda item: True))  # type: ignore[arg-type]
    task = asyncio.create_task(queue.submit(7))
    await settle()
    assert [p.item for p, _ in taken] == [7] and not task.done()  # waits for its result
    taken[0][0].future.set_result("served")
    assert await task == "served"
    assert len(queue) == 0

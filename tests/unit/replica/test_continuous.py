"""Continuous batcher: iteration-level joins and leaves, exact with an inline counting engine."""

from __future__ import annotations

import asyncio

from replica.batching import ContinuousBatcher, QueueKnobs
from replica.batching.clock import FakeClock
from replica.batching.testing import CountingEngine, InlineExecutor
from replica.generation import GenRequest, TokenEvent


def request(max_tokens: int, prompt_len: int = 3) -> GenRequest:
    return GenRequest(tuple(range(prompt_len)), max_tokens, context_len=4096)


def batcher(engine: CountingEngine, **kwargs: int) -> ContinuousBatcher:
    knobs = {"max_num_seqs": 8, "max_batch_tokens": 1024} | kwargs
    return ContinuousBatcher(
        engine, executor=InlineExecutor(), clock=FakeClock(), knobs=QueueKnobs(), **knobs
    )


async def test_short_request_arriving_during_a_long_one_finishes_first() -> None:
    engine = CountingEngine()
    b = batcher(engine)
    long = asyncio.create_task(b.submit(request(max_tokens=1000)))
    while len(engine.plans) < 5:
        await asyncio.sleep(0)
    short = await b.submit(request(max_tokens=3))
    assert short.text == "abc"
    assert not long.done()
    joined = next(p for p in engine.plans if p.prefill and p.decode)
    assert len(joined.decode) == 1  # the newcomer was prefilled beside the running sequence
    assert (await long).finish_reason == "length"
    await b.close()
    assert engine.live_sequences == 0


async def test_finished_sequences_leave_and_waiting_ones_join() -> None:
    engine = CountingEngine()
    b = batcher(engine, max_num_seqs=2)
    results = await asyncio.gather(*(b.submit(request(n)) for n in (2, 5, 3)))
    assert [len(r.token_ids) for r in results] == [2, 5, 3]
    assert max(p.size for p in engine.plans) <= 2
    third = next(i for i, p in enumerate(engine.plans) if len(p.prefill) == 1 and p.decode)
    assert engine.plans[third].release  # the finished one was released as the third joined
    await b.close()


async def test_token_budget_limits_prefill_per_step() -> None:
    engine = CountingEngine()
    b = batcher(engine, max_batch_tokens=10)
    await asyncio.gather(*(b.submit(request(2, prompt_len=6)) for _ in range(3)))
    assert all(
        sum(len(r.prompt_ids) for r in p.prefill) + len(p.decode) <= 10 for p in engine.plans
    )
    await b.close()


async def test_tokens_stream_as_they_are_produced() -> None:
    engine = CountingEngine()
    b = batcher(engine)
    seen: list[TokenEvent] = []
    req = GenRequest((1, 2), 4, context_len=64, sink=seen.append)
    completion = await b.submit(req)
    assert [e.text for e in seen] == ["a", "b", "c", "d"]
    assert seen[-1].finish_reason == "length"
    assert completion.text == "abcd"
    await b.close()


async def test_stop_string_ends_the_sequence_early() -> None:
    engine = CountingEngine()
    b = batcher(engine)
    req = GenRequest((1,), 20, context_len=64, stop=("cd",))
    completion = await b.submit(req)
    assert completion.text == "ab"
    assert completion.finish_reason == "stop"
    await b.close()


async def test_cancelled_sequence_is_released() -> None:
    engine = CountingEngine()
    b = batcher(engine)
    task = asyncio.create_task(b.submit(request(10_000)))
    while len(engine.plans) < 3:
        await asyncio.sleep(0)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await b.submit(request(2))
    assert b.load().running == 0
    await b.close()
    assert engine.live_sequences == 0

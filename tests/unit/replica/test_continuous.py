"""Continuous batcher: iteration-level joins and leaves, exact with an inline counting engine
(one step per slice); then on a real forward thread."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from replica.batching import ContinuousBatcher, Load, NoBatcher, QueueKnobs
from replica.batching.clock import FakeClock
from replica.batching.observer import NullObserver
from replica.batching.testing import CountingEngine, InlineExecutor, RecordingForward
from replica.engines.base import KvLayout, StepPlan
from replica.errors import BadRequest
from replica.generation import GenRequest, TokenEvent


def request(max_tokens: int, prompt_len: int = 3) -> GenRequest:
    return GenRequest(tuple(range(prompt_len)), max_tokens, context_len=4096)


def batcher(engine: CountingEngine, **kwargs: int) -> ContinuousBatcher:
    knobs = {"max_num_seqs": 8, "max_batch_tokens": 1024} | kwargs
    return ContinuousBatcher(
        engine, executor=InlineExecutor(), clock=FakeClock(), knobs=QueueKnobs(), slice_s=0,
        **knobs,
    )  # fmt: skip


async def test_short_request_arriving_during_a_long_one_finishes_first() -> None:
    engine = CountingEngine()
    b = batcher(engine)
    long = asyncio.create_task(b.submit(request(max_tokens=1000)))
    while len(engine.plans) < 5:
        await asyncio.sleep(0)
    short = await b.submit(request(max_tokens=3))
    assert short.text == "abc"
    assert not long.done()
    joined = next(p for p in engine.plans if len(p.work) == 2)
    assert [w.is_decode for w in joined.work] == [True, False]  # prefilled beside the decode
    assert (await long).finish_reason == "length"
    await b.close()
    assert engine.live_sequences == 0


async def test_finished_sequences_leave_and_waiting_ones_join() -> None:
    engine = CountingEngine()
    b = batcher(engine, max_num_seqs=2)
    results = await asyncio.gather(*(b.submit(request(n)) for n in (2, 5, 3)))
    assert [len(r.token_ids) for r in results] == [2, 5, 3]
    assert max(p.size for p in engine.plans) <= 2
    third = next(i for i, p in enumerate(engine.plans) if i and any(w.start == 0 for w in p.work))
    assert engine.plans[third].release  # the finished one was released as the third joined
    await b.close()


async def test_token_budget_limits_prefill_per_step() -> None:
    engine = CountingEngine()
    b = batcher(engine, max_batch_tokens=10)
    await asyncio.gather(*(b.submit(request(2, prompt_len=6)) for _ in range(3)))
    assert all(p.tokens <= 10 for p in engine.plans)
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


async def test_a_long_prompt_is_prefilled_in_chunks_while_running_sequences_decode() -> None:
    engine = CountingEngine()
    b = batcher(engine, max_batch_tokens=64)
    running = [asyncio.create_task(b.submit(request(200))) for _ in range(3)]
    while len(engine.plans) < 5:
        await asyncio.sleep(0)
    long = GenRequest(tuple(range(1, 301)), 4, context_len=4096)
    joined_at = len(engine.plans)
    assert (await b.submit(long)).text == "abcd"
    chunks = [(i, w) for i, p in enumerate(engine.plans) for w in p.work if w.id == long.id]
    prefill = [w for _, w in chunks if not w.is_decode]
    assert len(prefill) == 5  # 300 tokens over steps of 64 - 3 decode tokens
    assert sum(len(w.tokens) for w in prefill) == 300
    assert [w.start for w in prefill] == [0, 61, 122, 183, 244]
    assert [w.sample for w in prefill] == [False] * 4 + [True]
    for index in (i for i, w in chunks if not w.is_decode):  # the others decoded every step
        assert sum(w.is_decode for w in engine.plans[index].work) == 3
    assert all(p.tokens <= 64 for p in engine.plans[joined_at:])
    await asyncio.gather(*running)
    await b.close()
    assert engine.live_sequences == 0


async def test_out_of_kv_memory_preempts_the_newest_and_every_request_completes() -> None:
    engine = CountingEngine(KvLayout(num_blocks=24, block_size=16))  # 384 tokens
    b = batcher(engine, max_num_seqs=16)
    results = await asyncio.gather(*(b.submit(request(120, prompt_len=30)) for _ in range(64)))
    assert all(len(r.token_ids) == 120 for r in results)  # 150 tokens each, 2.5 fit at once
    alphabet = "".join(chr(ord("a") + i % 26) for i in range(120))
    assert all(r.text == alphabet for r in results)  # recomputed, never repeated or skipped
    assert b.blocks.stats().preemptions > 0
    assert b.blocks.stats().used_blocks == 0
    assert all(p.tokens <= 1024 for p in engine.plans)
    await b.close()
    assert engine.live_sequences == 0


async def test_a_repeated_prompt_computes_only_its_uncached_tail() -> None:
    engine = CountingEngine()
    b = ContinuousBatcher(
        engine, executor=InlineExecutor(), clock=FakeClock(), max_num_seqs=4,
        max_batch_tokens=4096, prefix_cache=True,
    )  # fmt: skip
    prompt = tuple(range(1, 2002))
    first = await b.submit(GenRequest(prompt, 2, context_len=4096))
    before = len(engine.plans)
    second = await b.submit(GenRequest(prompt, 2, context_len=4096))
    assert (first.cached_tokens, second.cached_tokens) == (0, 2000)
    assert engine.plans[before].work[0].start == 2000
    assert engine.plans[before].tokens == 1
    assert second.text == first.text
    await b.close()


async def test_a_request_larger_than_kv_memory_is_refused_up_front() -> None:
    b = batcher(CountingEngine(KvLayout(num_blocks=4, block_size=16)))
    with pytest.raises(BadRequest, match="KV"):
        await b.submit(request(60, prompt_len=10))
    await b.close()


class PacedEngine(CountingEngine):
    """A counting engine whose every step takes `step_s`, as a forward pass does."""

    def __init__(self, step_s: float, kv: KvLayout | None = None) -> None:
        super().__init__(kv)
        self.step_s = step_s

    def step(self, plan: StepPlan) -> dict[int, int]:
        time.sleep(self.step_s)
        return super().step(plan)


async def test_the_loop_reads_load_and_cache_safely_while_the_forward_thread_steps() -> None:
    """Steps on a real forward thread; the event loop reads `load` and the cached blocks
    between them, as the metrics scrape and the cache endpoint do, and every request ends."""
    engine = PacedEngine(0.0005, KvLayout(num_blocks=40, block_size=16))  # preempts as it goes
    with ThreadPoolExecutor(1, thread_name_prefix="forward") as executor:
        b = ContinuousBatcher(
            engine, executor=executor, max_num_seqs=8, max_batch_tokens=64, prefix_cache=True
        )
        prompts = [tuple(range(i % 3, 40 + i % 3)) for i in range(48)]
        tasks = [
            asyncio.create_task(b.submit(GenRequest(p, 60, context_len=4096))) for p in prompts
        ]
        reads = 0
        while not all(t.done() for t in tasks):
            load = b.load()
            assert 0 <= load.running <= 8 and load.queued >= 0
            assert len(b.cached_hashes()) <= 40
            reads += 1
            await asyncio.sleep(0)
        done = [t.result() for t in tasks]
        assert all(len(c.token_ids) == 60 for c in done)
        assert reads > 10
        assert b.load() == Load(queued=0, running=0, capacity=8, backlog_tokens=0, kv_usage=0.0)
        await b.close()
    assert engine.live_sequences == 0


async def test_the_forward_thread_takes_other_models_work_between_slices() -> None:
    """One forward thread for two models, as in the replica: a long sequence on the continuous
    batcher gives the thread back every `slice_s`, so the other model's request is served
    while that sequence is still generating."""
    engine = PacedEngine(step_s=0.002)
    with ThreadPoolExecutor(1, thread_name_prefix="forward") as executor:
        b = ContinuousBatcher(
            engine, executor=executor, max_num_seqs=4, max_batch_tokens=64, slice_s=0.01
        )
        other = NoBatcher(RecordingForward(lambda x: x * 2), executor=executor)
        long = asyncio.create_task(b.submit(request(max_tokens=1000)))  # 2 s or more of steps
        while len(engine.plans) < 3:
            await asyncio.sleep(0.001)
        assert await other.submit(21) == 42
        assert not long.done()
        long.cancel()
        await asyncio.gather(long, return_exceptions=True)
        await asyncio.gather(b.close(), other.close())
    assert engine.live_sequences == 0


async def test_a_request_whose_sink_fails_fails_alone() -> None:
    """A sink that raises (a fault in whoever reads the tokens) fails its own request with that
    error; the others in the same steps finish, and nothing is left held."""
    engine = CountingEngine()
    b = batcher(engine)

    def broken(event: TokenEvent) -> None:
        if event.text == "c":
            raise RuntimeError("the reader broke")

    bad = asyncio.create_task(b.submit(GenRequest((1, 2), 10, context_len=64, sink=broken)))
    good = asyncio.create_task(b.submit(request(max_tokens=10)))
    with pytest.raises(RuntimeError, match="the reader broke"):
        await bad
    assert (await good).text == "abcdefghij"
    assert b.load().running == 0 and b.blocks.stats().used_blocks == 0
    await b.close()
    assert engine.live_sequences == 0


class ForgetfulEngine(CountingEngine):
    """Its third step returns no tokens: a malformed answer from the engine."""

    def step(self, plan: StepPlan) -> dict[int, int]:
        out = super().step(plan)
        return {} if len(self.plans) == 3 else out


async def fails_then_serves(
    b: ContinuousBatcher, engine: CountingEngine, error: type[Exception], match: str
) -> None:
    """Two running requests fail with `error`; the next one is served; nothing is left held."""
    running = [asyncio.create_task(b.submit(request(max_tokens=10))) for _ in range(2)]
    for task in running:
        with pytest.raises(error, match=match):
            await task
    assert (await b.submit(request(max_tokens=3))).text == "abc"
    assert b.load().running == 0 and b.blocks.stats().used_blocks == 0
    await b.close()
    assert engine.live_sequences == 0


async def test_an_engine_answer_without_a_token_fails_its_step_and_serving_goes_on() -> None:
    engine = ForgetfulEngine()
    await fails_then_serves(batcher(engine), engine, RuntimeError, "the engine returned no token")


class BrokenObserver(NullObserver):
    """Its third `on_batch` raises: a fault in the batcher's own bookkeeping."""

    def __init__(self) -> None:
        self.batches = 0

    def on_batch(self, size: int, compute_s: float) -> None:
        self.batches += 1
        if self.batches == 3:
            raise ValueError("bookkeeping broke")


async def test_a_fault_in_the_batcher_itself_fails_what_it_holds_and_serving_goes_on() -> None:
    engine = CountingEngine()
    b = ContinuousBatcher(
        engine, executor=InlineExecutor(), clock=FakeClock(), max_num_seqs=8,
        max_batch_tokens=1024, observer=BrokenObserver(), slice_s=0,
    )  # fmt: skip
    await fails_then_serves(b, engine, ValueError, "bookkeeping broke")

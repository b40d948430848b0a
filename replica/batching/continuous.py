"""`continuous` batcher: iteration-level scheduling with paged KV memory and chunked prefill.

Each step has a token budget (`max_batch_tokens`). Running sequences' decode tokens are
scheduled first; what is left of the budget prefills, in arrival order, the sequences still
prefilling and then newcomers, in chunks: a long prompt is prefilled over several steps while
everyone else keeps decoding every step, so a join stalls decodes by one chunk at most.

KV memory is counted in blocks (`replica/kv.py`). A newcomer is admitted only when blocks for
its whole prompt fit (after the longest cached prefix, which it does not compute again). When
a decoding sequence needs a block and none is free, the newest running sequence is preempted:
its blocks are freed and it goes back to the front of the line, to be recomputed (prompt and
the tokens it already streamed) when memory allows. The client only sees it take longer.

Steps are pipelined, as vLLM's async scheduling does: the next step is planned and queued on the
forward thread while the current one runs, so the thread goes from step to step without waiting
for the event loop, and the loop streams one step's tokens while the next computes. A decode
planned before its input token is known carries `PENDING` (the engine puts the token in); a
sequence that turns out to have finished (a stop string) costs one discarded row; results that
come back for a sequence already gone (finished, cancelled, failed or preempted) are dropped.

Given `kv_events` (replica/kv_events.py), the batcher hands it what the prefix cache did: one
batch per step that stored or evicted blocks, and `AllBlocksCleared` once, at the start.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass

from replica.batching.base import DEFAULT_KNOBS, Load, QueueKnobs
from replica.batching.clock import Clock, LoopClock
from replica.batching.observer import BatchObserver, NullObserver
from replica.batching.queue import Pending, RequestQueue
from replica.engines.base import PENDING, GenerationEngine, StepPlan, Work
from replica.errors import BadRequest
from replica.generation import Completion, GenRequest, SequenceTracker
from replica.kv import BlockManager, CacheCleared, CacheEvent

KvEvents = Callable[[Sequence[CacheEvent]], object]


@dataclass(eq=False)
class _Seq:
    pending: Pending[GenRequest, Completion]
    tracker: SequenceTracker
    ids: list[int]  # prompt, then every token generated so far (whose result came back)
    computed: int = 0  # leading tokens whose keys/values are in the sequence's blocks
    scheduled: int = 0  # leading tokens computed or in a step in flight
    drawing: bool = False  # a step in flight samples its next token

    @property
    def id(self) -> int:
        return self.pending.item.id

    @property
    def length(self) -> int:
        """Its tokens, the one being drawn included."""
        return len(self.ids) + self.drawing

    @property
    def drawing_its_last(self) -> bool:
        """The token in flight is its last (`max_tokens` or the context): nothing to plan."""
        tracker = self.tracker
        return self.drawing and len(tracker.token_ids) + 1 >= tracker.request.token_budget


@dataclass(frozen=True)
class _InFlight:
    plan: StepPlan
    result: asyncio.Future[tuple[dict[int, int], float]]  # tokens, compute seconds
    submitted_at: float


class ContinuousBatcher:
    def __init__(
        self,
        engine: GenerationEngine,
        *,
        executor: Executor,
        max_num_seqs: int,
        max_batch_tokens: int,
        prefix_cache: bool = False,
        knobs: QueueKnobs = DEFAULT_KNOBS,
        clock: Clock | None = None,
        observer: BatchObserver | None = None,
        kv_events: KvEvents | None = None,
    ) -> None:
        if max_batch_tokens < max_num_seqs:
            raise ValueError("max_batch_tokens must be at least max_num_seqs (one decode each)")
        self._engine = engine
        self._executor = executor
        self.capacity = max_num_seqs
        self._max_batch_tokens = max_batch_tokens
        self._kv_events = kv_events
        self._events: list[CacheEvent] = []  # since the last step
        self.blocks = BlockManager(
            engine.kv.num_blocks,
            engine.kv.block_size,
            prefix_cache=prefix_cache,
            sink=None if kv_events is None else self._events.append,
        )
        if kv_events is not None:
            kv_events((CacheCleared(),))
        self._observer = observer or NullObserver()
        self._queue: RequestQueue[GenRequest, Completion] = RequestQueue(
            max_queue=knobs.max_queue,
            queue_timeout_s=knobs.queue_timeout_s,
            clock=clock or LoopClock(),
            observer=self._observer,
        )
        self._running: dict[int, _Seq] = {}  # admission order: the last is the newest
        self._preempted: deque[_Seq] = deque()  # back to the front of the line
        self._release: list[int] = []
        self._task: asyncio.Task[None] | None = None

    async def submit(self, item: GenRequest) -> Completion:
        need = self.blocks.blocks_for(len(item.prompt_ids) + item.token_budget)
        if need > self.blocks.num_blocks:
            raise BadRequest(
                f"prompt: {len(item.prompt_ids)} tokens plus max_tokens {item.max_tokens} need "
                f"{need} KV blocks; this model's KV memory holds {self.blocks.num_blocks} "
                f"({self.blocks.num_blocks * self.blocks.block_size} tokens)"
            )
        if self._task is None and not self._queue.closed:
            self._task = asyncio.create_task(self._loop(), name="ContinuousBatcher")
        return await self._queue.submit(item)

    def load(self) -> Load:
        backlog = sum(p.item.token_budget for p in self._queue) + sum(
            max(0, s.tracker.request.token_budget - len(s.tracker.token_ids))
            for s in (*self._running.values(), *self._preempted)
        )
        return Load(
            queued=len(self._queue) + len(self._preempted),
            running=len(self._running),
            capacity=self.capacity,
            backlog_tokens=backlog,
            kv_usage=self.blocks.stats().usage,
        )

    async def close(self) -> None:
        """Fail queued requests, let running (and preempted) sequences finish, stop the task."""
        self._queue.close()
        if self._task is not None:
            await self._task

    async def _loop(self) -> None:
        """Plan a step, queue it, then take the results of the step before it (at most two in
        flight: one running, one queued behind it)."""
        in_flight: deque[_InFlight] = deque()
        while True:
            self._drop_cancelled()
            busy = self._running or self._preempted or self._release or in_flight
            if not busy and not await self._queue.wait_for(1, None):
                return
            plan = self._schedule()
            if plan.size or plan.release:
                in_flight.append(self._submit(plan))
            if in_flight and (len(in_flight) > 1 or not plan.size):
                await self._finish(in_flight.popleft())
            if self._events and self._kv_events is not None:
                self._kv_events(tuple(self._events))
                self._events.clear()

    # -- scheduling -------------------------------------------------------------------------

    def _schedule(self) -> StepPlan:
        budget = self._max_batch_tokens
        work: list[Work] = []
        preempted_now: set[int] = set()
        for seq in list(self._running.values()):  # decodes first, oldest first
            if seq.id in preempted_now or seq.length - seq.scheduled != 1 or seq.drawing_its_last:
                continue
            if not self._make_room(seq, preempted_now):
                continue
            work.append(self._work(seq, 1))
            budget -= 1
        for seq in self._running.values():  # then sequences part-way through their prefill
            remaining = seq.length - seq.scheduled
            if budget <= 0:
                break
            if remaining > 1:
                chunk = min(remaining, budget)
                work.append(self._work(seq, chunk))
                budget -= chunk
        while budget > 0 and len(self._running) < self.capacity:  # then newcomers
            joined = self._admit(preempted_now)
            if joined is None:
                break
            chunk = min(joined.length - joined.scheduled, budget)
            work.append(self._work(joined, chunk))
            budget -= chunk
        release, self._release = tuple(self._release), []
        return StepPlan(tuple(work), release)

    def _make_room(self, seq: _Seq, preempted_now: set[int]) -> bool:
        """A block for the decode token, preempting the newest sequences until one is free;
        False when `seq` itself was the newest and had to go."""
        while not self.blocks.grow(seq.id, seq.scheduled + 1):
            newest = next(reversed(self._running.values()))
            self._preempt(newest)
            preempted_now.add(newest.id)
            if newest is seq:
                return False
        return True

    def _preempt(self, seq: _Seq) -> None:
        del self._running[seq.id]
        self.blocks.free(seq.id, preempted=True)
        seq.computed = seq.scheduled = 0
        seq.drawing = False  # a token in flight is dropped: the recompute draws it again
        self._preempted.appendleft(seq)

    def _admit(self, preempted_now: set[int]) -> _Seq | None:
        """The next sequence in line (a preempted one before any newcomer), if its blocks fit."""
        if self._preempted:
            seq = self._preempted[0]
            if seq.id in preempted_now:
                return None
            cached = self.blocks.allocate(seq.id, seq.ids)
            if cached is None:
                return None
            self._preempted.popleft()
        else:
            head = self._queue.peek()
            if head is None:
                return None
            cached = self.blocks.allocate(head.item.id, head.item.prompt_ids)
            if cached is None:
                return None
            (pending,) = self._queue.take(1)
            seq = _Seq(pending, SequenceTracker(pending.item), list(pending.item.prompt_ids))
            seq.tracker.cached_tokens = cached
        seq.computed = seq.scheduled = cached
        self._running[seq.id] = seq
        seq.tracker.batch_size = len(self._running)  # the step it joins, itself included
        return seq

    def _work(self, seq: _Seq, tokens: int) -> Work:
        start = seq.scheduled
        end = start + tokens
        sample = end == seq.length
        ids = tuple(seq.ids[start:end]) if end <= len(seq.ids) else (PENDING,)
        seq.scheduled = end
        seq.drawing = seq.drawing or sample
        return Work(seq.pending.item, ids, start, tuple(self.blocks.table(seq.id)), sample)

    def _drop_cancelled(self) -> None:
        for seq in list(self._running.values()):
            if seq.pending.future.done():
                self._forget(seq)
        for seq in [s for s in self._preempted if s.pending.future.done()]:
            self._preempted.remove(seq)
            self._release.append(seq.id)

    def _forget(self, seq: _Seq) -> None:
        del self._running[seq.id]
        self.blocks.free(seq.id)
        self._release.append(seq.id)

    # -- running a step ---------------------------------------------------------------------

    def _submit(self, plan: StepPlan) -> _InFlight:
        loop = asyncio.get_running_loop()
        result = loop.run_in_executor(self._executor, self._timed_step, plan)
        return _InFlight(plan, result, time.perf_counter())

    def _timed_step(self, plan: StepPlan) -> tuple[dict[int, int], float]:
        """On the forward thread: the step and its own compute time (not its wait in line)."""
        started = time.perf_counter()
        return self._engine.step(plan), time.perf_counter() - started

    async def _finish(self, step: _InFlight) -> None:
        plan = step.plan
        try:
            tokens, compute_s = await step.result
        except Exception as error:  # fail the sequences in this step; keep serving
            if plan.size:
                self._observer.on_batch(plan.size, time.perf_counter() - step.submitted_at)
            self._fail(plan, error)
            return
        if plan.size:
            self._observer.on_batch(plan.size, compute_s)
        for w in plan.work:
            seq = self._running.get(w.id)
            if seq is None:  # gone since it was planned
                continue
            seq.computed = w.start + len(w.tokens)
            self.blocks.commit(seq.id, seq.ids, seq.computed)
            if not w.sample:
                continue
            token = tokens[w.id]
            seq.drawing = seq.computed < seq.scheduled  # the next step, queued, draws again
            seq.ids.append(token)
            if seq.tracker.push(token).finish_reason is not None:
                self._forget(seq)
                if not seq.pending.future.done():
                    seq.pending.future.set_result(seq.tracker.completion())

    def _fail(self, plan: StepPlan, error: Exception) -> None:
        for w in plan.work:
            seq = self._running.get(w.id)
            if seq is None:
                continue
            self._forget(seq)
            if not seq.pending.future.done():
                seq.pending.future.set_exception(error)

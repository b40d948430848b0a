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

The step loop runs on the forward thread, as the static batcher's `generate_batch` does: plan,
step, hand out the tokens, plan again, with no hop to the event loop between steps, so the
loop's own work (HTTP, streaming) never holds a step back. The thread takes newcomers from the
request queue itself and tells the loop what to resolve: token events go through each
request's sink (thread-safe, as for static batches), finished and failed requests in one
`call_soon_threadsafe` per step. The batcher's state (running and preempted sequences, KV
blocks) belongs to the thread while a step runs; `_lock` guards it for the loop's readers
(`load`, `cached_hashes`). The thread gives the executor back every `slice_s` seconds, so
other models' forward passes queued on the same thread get their turn; the loop hands it the
next slice at once while there is work. (A replica serving one model never slices.)

Given `kv_events` (replica/kv_events.py), the batcher hands it what the prefix cache did: one
batch per step that stored or evicted blocks, and `AllBlocksCleared` once, at the start.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field

from replica.batching.base import DEFAULT_KNOBS, Load, QueueKnobs
from replica.batching.clock import Clock, LoopClock
from replica.batching.observer import BatchObserver, NullObserver
from replica.batching.queue import Pending, RequestQueue
from replica.engines.base import GenerationEngine, StepPlan, Work
from replica.errors import BadRequest
from replica.generation import Completion, GenRequest, SequenceTracker
from replica.kv import BlockManager, CacheCleared, CacheEvent

log = logging.getLogger("replica")

KvEvents = Callable[[Sequence[CacheEvent]], object]
SHARED_SLICE_S = 0.025  # the forward thread's turn when other models wait for it
Outcome = tuple[asyncio.Future[Completion], Completion | BaseException]


@dataclass(eq=False)
class _Seq:
    pending: Pending[GenRequest, Completion]
    tracker: SequenceTracker
    ids: list[int]  # prompt, then every token generated so far
    computed: int = 0  # leading tokens whose keys/values are in the sequence's blocks
    scheduled: int = 0  # leading tokens computed or planned in the step being built
    id: int = field(init=False)

    def __post_init__(self) -> None:
        self.id = self.pending.item.id


def _settle(outcomes: list[Outcome]) -> None:
    """On the event loop: resolve what one step finished or failed (unless the client left)."""
    for future, outcome in outcomes:
        if future.done():
            continue
        if isinstance(outcome, BaseException):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)


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
        slice_s: float = SHARED_SLICE_S,
    ) -> None:
        if max_batch_tokens < max_num_seqs:
            raise ValueError("max_batch_tokens must be at least max_num_seqs (one decode each)")
        self._engine = engine
        self._executor = executor
        self.capacity = max_num_seqs
        self._max_batch_tokens = max_batch_tokens
        self._slice_s = slice_s
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
        self._lock = threading.Lock()  # the state below, while the forward thread runs steps
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
            self._task = asyncio.create_task(self._drive(), name="ContinuousBatcher")
        return await self._queue.submit(item)

    def load(self) -> Load:
        queued = list(self._queue)
        with self._lock:
            seqs = (*self._running.values(), *self._preempted)
            backlog = sum(p.item.token_budget for p in queued) + sum(
                max(0, s.tracker.request.token_budget - len(s.tracker.token_ids)) for s in seqs
            )
            return Load(
                queued=len(queued) + len(self._preempted),
                running=len(self._running),
                capacity=self.capacity,
                backlog_tokens=backlog,
                kv_usage=self.blocks.stats().usage,
            )

    def cached_hashes(self) -> list[int]:
        """The prefix cache's block hashes, oldest first (safe while a step runs)."""
        with self._lock:
            return self.blocks.cached_hashes()

    async def close(self) -> None:
        """Fail queued requests, let running (and preempted) sequences finish, stop the task."""
        self._queue.close()
        if self._task is not None:
            await self._task

    async def _drive(self) -> None:
        """Hand the forward thread one slice of steps at a time while there is work."""
        loop = asyncio.get_running_loop()
        while True:
            busy = self._running or self._preempted or self._release
            if not busy and not await self._queue.wait_for(1, None):
                return
            try:
                await loop.run_in_executor(self._executor, self._run_slice, loop)
            except Exception as error:  # a fault in the batcher itself: fail what it holds
                log.exception("continuous batcher: a step failed outside the engine")
                self._fail_all(error)

    # -- on the forward thread ----------------------------------------------------------------

    def _run_slice(self, loop: asyncio.AbstractEventLoop) -> None:
        """Steps until nothing is left to do or the slice is used up (at least one step)."""
        ends_at = time.perf_counter() + self._slice_s
        while True:
            with self._lock:
                self._drop_cancelled()
                plan = self._schedule()
            if not plan.size and not plan.release:
                return
            error: Exception | None = None
            started = time.perf_counter()
            try:
                tokens = self._engine.step(plan)
                missing = [w.id for w in plan.work if w.sample and w.id not in tokens]
                if missing:
                    raise RuntimeError(f"the engine returned no token for sequences {missing}")
            except Exception as raised:  # fail the sequences in this step; keep serving
                tokens, error = {}, raised
            if plan.size:
                self._observer.on_batch(plan.size, time.perf_counter() - started)
            outcomes: list[Outcome] = []
            try:
                with self._lock:
                    if error is None:
                        self._finish(plan, tokens, outcomes)
                    else:
                        self._fail(plan, error, outcomes)
                    events = tuple(self._events)
                    self._events.clear()
            finally:  # (what finished before a fault in the bookkeeping is still handed out)
                if outcomes:
                    loop.call_soon_threadsafe(_settle, outcomes)
            if events and self._kv_events is not None:
                self._kv_events(events)
            if time.perf_counter() >= ends_at:
                return

    def _schedule(self) -> StepPlan:
        budget = self._max_batch_tokens
        work: list[Work] = []
        preempted_now: set[int] = set()
        for seq in list(self._running.values()):  # decodes first, oldest first
            if seq.id in preempted_now or len(seq.ids) - seq.scheduled != 1:
                continue
            if not self._make_room(seq, preempted_now):
                continue
            work.append(self._work(seq, 1))
            budget -= 1
        for seq in self._running.values():  # then sequences part-way through their prefill
            remaining = len(seq.ids) - seq.scheduled
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
            chunk = min(len(joined.ids) - joined.scheduled, budget)
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
            taken = self._queue.take_head_if(
                lambda item: self.blocks.allocate(item.id, item.prompt_ids)
            )
            if taken is None:
                return None
            pending, cached = taken
            seq = _Seq(pending, SequenceTracker(pending.item), list(pending.item.prompt_ids))
            seq.tracker.cached_tokens = cached
        seq.computed = seq.scheduled = cached
        self._running[seq.id] = seq
        seq.tracker.batch_size = len(self._running)  # the step it joins, itself included
        return seq

    def _work(self, seq: _Seq, tokens: int) -> Work:
        start = seq.scheduled
        end = start + tokens
        seq.scheduled = end
        sample = end == len(seq.ids)
        return Work(seq.pending.item, tuple(seq.ids[start:end]), start,
                    tuple(self.blocks.table(seq.id)), sample)  # fmt: skip

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

    def _finish(self, plan: StepPlan, tokens: dict[int, int], done: list[Outcome]) -> None:
        for w in plan.work:
            seq = self._running[w.id]  # (only this thread removes sequences)
            seq.computed = w.start + len(w.tokens)
            self.blocks.commit(seq.id, seq.ids, seq.computed)
            if not w.sample:
                continue
            token = tokens[w.id]
            seq.ids.append(token)
            try:
                finished = seq.tracker.push(token).finish_reason is not None
            except Exception as error:  # its sink or finish hook failed: it fails, alone
                log.exception("request %d: handing out a token failed", seq.id)
                self._forget(seq)
                done.append((seq.pending.future, error))
                continue
            if finished:
                self._forget(seq)
                done.append((seq.pending.future, seq.tracker.completion()))

    def _fail_all(self, error: BaseException) -> None:
        """On the event loop, the thread idle: every running and preempted sequence fails."""
        with self._lock:
            seqs = [*self._running.values(), *self._preempted]
            for seq in list(self._running.values()):
                self._forget(seq)
            self._release.extend(seq.id for seq in self._preempted)  # (their blocks are free)
            self._preempted.clear()
        _settle([(seq.pending.future, error) for seq in seqs])

    def _fail(self, plan: StepPlan, error: BaseException, failed: list[Outcome]) -> None:
        for w in plan.work:
            seq = self._running.get(w.id)
            if seq is not None:
                self._forget(seq)
                failed.append((seq.pending.future, error))

"""`continuous` batcher: iteration-level scheduling for generation.

Every decode step, finished sequences leave and queued ones join (bounded by `max_num_seqs`
and `max_batch_tokens` = prefill tokens of newcomers + one token per running sequence).
Newcomers are prefilled in the same step; each token goes to its request's sink at once.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import Executor
from dataclasses import dataclass

from replica.batching.base import DEFAULT_KNOBS, Load, QueueKnobs
from replica.batching.clock import Clock, LoopClock
from replica.batching.observer import BatchObserver, NullObserver
from replica.batching.queue import Pending, RequestQueue
from replica.engines.base import GenerationEngine, StepPlan
from replica.generation import Completion, GenRequest, SequenceTracker


@dataclass(eq=False)
class _Running:
    pending: Pending[GenRequest, Completion]
    tracker: SequenceTracker


class ContinuousBatcher:
    def __init__(
        self,
        engine: GenerationEngine,
        *,
        executor: Executor,
        max_num_seqs: int,
        max_batch_tokens: int,
        knobs: QueueKnobs = DEFAULT_KNOBS,
        clock: Clock | None = None,
        observer: BatchObserver | None = None,
    ) -> None:
        self._engine = engine
        self._executor = executor
        self.capacity = max_num_seqs
        self._max_batch_tokens = max_batch_tokens
        self._observer = observer or NullObserver()
        self._queue: RequestQueue[GenRequest, Completion] = RequestQueue(
            max_queue=knobs.max_queue,
            queue_timeout_s=knobs.queue_timeout_s,
            clock=clock or LoopClock(),
            observer=self._observer,
        )
        self._running: dict[int, _Running] = {}
        self._release: list[int] = []
        self._task: asyncio.Task[None] | None = None

    async def submit(self, item: GenRequest) -> Completion:
        if self._task is None and not self._queue.closed:
            self._task = asyncio.create_task(self._loop(), name="ContinuousBatcher")
        return await self._queue.submit(item)

    def load(self) -> Load:
        backlog = sum(p.item.token_budget for p in self._queue) + sum(
            max(0, r.tracker.request.token_budget - len(r.tracker.token_ids))
            for r in self._running.values()
        )
        return Load(
            queued=len(self._queue),
            running=len(self._running),
            capacity=self.capacity,
            backlog_tokens=backlog,
        )

    async def close(self) -> None:
        """Fail queued requests, let running sequences finish, stop the task."""
        self._queue.close()
        if self._task is not None:
            await self._task

    async def _loop(self) -> None:
        while True:
            self._drop_cancelled()
            if not self._running and not self._release and not await self._queue.wait_for(1, None):
                return
            newcomers = self._admit()
            plan = StepPlan(
                prefill=tuple(p.item for p in newcomers),
                decode=tuple(self._running),
                release=tuple(self._release),
            )
            self._release = []
            for pending in newcomers:
                self._running[pending.item.id] = _Running(pending, SequenceTracker(pending.item))
            if plan.size:
                await self._step(plan)
            elif plan.release:
                self._engine.step(plan)  # nothing to compute: only frees state

    def _admit(self) -> list[Pending[GenRequest, Completion]]:
        admitted: list[Pending[GenRequest, Completion]] = []
        tokens = len(self._running)
        while (head := self._queue.peek()) is not None:
            if len(self._running) + len(admitted) >= self.capacity:
                break
            cost = len(head.item.prompt_ids)
            if tokens + cost > self._max_batch_tokens and (admitted or self._running):
                break
            tokens += cost
            admitted.extend(self._queue.take(1))
        return admitted

    def _drop_cancelled(self) -> None:
        for seq_id, running in list(self._running.items()):
            if running.pending.future.done():
                del self._running[seq_id]
                self._release.append(seq_id)

    async def _step(self, plan: StepPlan) -> None:
        started = time.perf_counter()
        try:
            loop = asyncio.get_running_loop()
            tokens = await loop.run_in_executor(self._executor, self._engine.step, plan)
        except Exception as error:  # fail the sequences in this step; keep serving
            self._fail(plan, error)
            return
        finally:
            self._observer.on_batch(plan.size, time.perf_counter() - started)
        for seq_id, token in tokens.items():
            running = self._running.get(seq_id)
            if running is None:
                continue
            if running.tracker.push(token).finish_reason is not None:
                self._finish(seq_id, running)

    def _finish(self, seq_id: int, running: _Running) -> None:
        del self._running[seq_id]
        self._release.append(seq_id)
        if not running.pending.future.done():
            running.pending.future.set_result(running.tracker.completion())

    def _fail(self, plan: StepPlan, error: Exception) -> None:
        ids = [r.id for r in plan.prefill] + list(plan.decode)
        for seq_id in ids:
            running = self._running.pop(seq_id, None)
            self._release.append(seq_id)
            if running is not None and not running.pending.future.done():
                running.pending.future.set_exception(error)

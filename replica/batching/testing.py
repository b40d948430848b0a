"""Test doubles shipped beside the batchers: run forward passes inline, record what they saw.

With `InlineExecutor` and `FakeClock` a batcher test is exact: nothing runs on another thread
and time moves only when the test says so.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Executor, Future
from typing import Any, TypeVar

from replica.engines.base import KvLayout, StepPlan

T = TypeVar("T")


class InlineExecutor(Executor):
    """Runs each submitted call at once on the caller's thread (the event loop in tests)."""

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        future: Future[T] = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as error:
            future.set_exception(error)
        return future


class RecordingForward:
    """A request-level forward pass that records each batch and returns f(item) per item."""

    def __init__(self, fn: Callable[[Any], Any] = lambda x: x, fail: bool = False) -> None:
        self.batches: list[list[Any]] = []
        self._fn = fn
        self.fail = fail

    def __call__(self, items: Sequence[Any]) -> list[Any]:
        self.batches.append(list(items))
        if self.fail:
            raise RuntimeError("forward pass failed")
        return [self._fn(item) for item in items]


class CountingEngine:
    """A generation engine whose sequences emit 'a', 'b', 'c', ...; records every plan.

    The nth generated token is the nth letter whatever steps it took, as a real engine's sampler
    keeps its place: a preempted sequence's recompute continues where the stream left off."""

    def __init__(self, kv: KvLayout | None = None) -> None:
        self.kv = kv or KvLayout(4096, 16)
        self.plans: list[StepPlan] = []
        self._live: set[int] = set()

    def step(self, plan: StepPlan) -> dict[int, int]:
        self.plans.append(plan)
        self._live.difference_update(plan.release)
        out = {}
        for w in plan.work:
            self._live.add(w.id)
            if w.sample:
                generated = w.start + len(w.tokens) - len(w.request.prompt_ids)
                out[w.id] = ord("a") + generated % 26
        return out

    @property
    def live_sequences(self) -> int:
        return len(self._live)

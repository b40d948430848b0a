"""Fault injection, for tests and fault drills only: a generation engine that fails on purpose.

`engine.fail_every_n_steps: N` in the replica config (unset by default) wraps whichever
generation engine was built so that every Nth forward step raises `InjectedFault`, as a real
device error would. The batcher fails the sequences in that step, so a real server can be made
to break a stream mid-way.
"""

from __future__ import annotations

from replica.engines.base import GenerationEngine, StepPlan


class InjectedFault(RuntimeError):
    """The failure `engine.fail_every_n_steps` asked for."""


class FailingEngine:
    def __init__(self, inner: GenerationEngine, every_n_steps: int) -> None:
        self._inner = inner
        self.kv = inner.kv
        self._every = every_n_steps
        self._steps = 0  # forward steps only: a plan that only releases state is not counted

    def step(self, plan: StepPlan) -> dict[int, int]:
        if plan.size:
            self._steps += 1
            if self._steps % self._every == 0:
                self._inner.step(StepPlan(release=plan.release))  # still free what was asked
                raise InjectedFault(
                    f"injected fault at forward step {self._steps} (engine.fail_every_n_steps)"
                )
        return self._inner.step(plan)

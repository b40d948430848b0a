"""The fault-injection hook: every Nth forward step fails; freeing state always goes through."""

from __future__ import annotations

import pytest

from replica.config import parse_config
from replica.engines.base import KvLayout, StepPlan, Work
from replica.engines.faults import FailingEngine, InjectedFault
from replica.generation import GenRequest


class RecordingEngine:
    kv = KvLayout(8)

    def __init__(self) -> None:
        self.plans: list[StepPlan] = []

    def step(self, plan: StepPlan) -> dict[int, int]:
        self.plans.append(plan)
        return {w.id: 65 if w.start == 0 else 66 for w in plan.work}


def test_every_nth_forward_step_fails_and_release_only_steps_do_not_count() -> None:
    inner = RecordingEngine()
    engine = FailingEngine(inner, every_n_steps=2)
    request = GenRequest((1,), 8, 64)
    prefill = StepPlan((Work(request, request.prompt_ids, 0, (0,)),))
    decode = StepPlan((Work(request, (65,), 1, (0,)),))
    assert engine.step(prefill) == {request.id: 65}
    assert engine.step(StepPlan(release=(99,))) == {}  # not a forward step
    with pytest.raises(InjectedFault, match="step 2"):
        engine.step(StepPlan(decode.work, release=(7,)))
    assert inner.plans[-1] == StepPlan(release=(7,))  # what the failed step freed, still freed
    assert engine.step(decode) == {request.id: 66}


def test_the_hook_is_off_unless_configured() -> None:
    assert parse_config({}).engine.fail_every_n_steps is None
    assert parse_config({"engine": {"fail_every_n_steps": 3}}).engine.fail_every_n_steps == 3

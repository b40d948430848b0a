"""Engine protocols, torch-free, and the request-level generation loop built on them.

A generation engine does one thing: `step(plan)` runs prefill for newcomers and one decode step
for running sequences, and returns each sequence's next token. Per-sequence state (KV cache,
sampler) lives inside the engine, keyed by `GenRequest.id`, until the plan releases it.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from replica.generation import Completion, GenRequest, SequenceTracker


@dataclass(frozen=True)
class StepPlan:
    prefill: tuple[GenRequest, ...] = ()
    decode: tuple[int, ...] = ()  # sequence ids already prefilled
    release: tuple[int, ...] = ()  # sequence ids whose state can be dropped

    @property
    def size(self) -> int:
        return len(self.prefill) + len(self.decode)


class GenerationEngine(Protocol):
    def step(self, plan: StepPlan) -> dict[int, int]: ...


class ClassifierEngine(Protocol):
    """`infer` maps row-major FP32 inputs (n_rows * input_size each) to n_rows * num_classes."""

    input_size: int
    num_classes: int

    def infer(self, batch: Sequence[array[float]]) -> list[array[float]]: ...


def generate_batch(engine: GenerationEngine, requests: Sequence[GenRequest]) -> list[Completion]:
    """Run a whole batch to completion (request-level batching); finished rows drop out."""
    trackers = {r.id: SequenceTracker(r) for r in requests}
    plan = StepPlan(prefill=tuple(requests))
    try:
        while plan.size:
            tokens = engine.step(plan)
            finished = []
            for seq_id, token in tokens.items():
                if trackers[seq_id].push(token).finish_reason is not None:
                    finished.append(seq_id)
            active = tuple(i for i in tokens if i not in finished)
            plan = StepPlan(decode=active, release=tuple(finished))
    finally:
        engine.step(StepPlan(release=tuple(trackers)))
    return [trackers[r.id].completion() for r in requests]

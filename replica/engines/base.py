"""Engine protocols, torch-free, and the request-level generation loop built on them.

A generation engine does one thing: `step(plan)` computes the scheduled tokens of each sequence
in the plan and returns the next token of every sequence whose scheduled tokens reach the end
of what it holds. One shape covers everything a scheduler asks for, as in vLLM's: a newcomer's
prompt (whole, or a chunk of it after a cached prefix or an earlier chunk), one decode token,
or a preempted sequence's recompute. KV memory is paged (`replica/kv.py`): each
`Work` carries the sequence's block table; per-sequence sampler state lives in the engine,
keyed by `GenRequest.id`, until the plan releases it.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from replica.generation import Completion, GenRequest, SequenceTracker
from replica.kv import BlockManager


@dataclass(frozen=True)
class KvLayout:
    """The engine's KV memory: `num_blocks` blocks of `block_size` token slots."""

    num_blocks: int
    block_size: int = 16

    @classmethod
    def holding(cls, tokens: int, block_size: int = 16) -> KvLayout:
        return cls(max(1, -(-tokens // block_size)), block_size)

    @property
    def tokens(self) -> int:
        return self.num_blocks * self.block_size


@dataclass(frozen=True)
class Work:
    """Compute `tokens` at positions `start ..` of sequence `request.id`, whose earlier
    positions are already in its blocks (or computed by an earlier step of the same engine);
    `sample`: return its next token."""

    request: GenRequest
    tokens: tuple[int, ...]
    start: int
    blocks: tuple[int, ...]
    sample: bool = True

    @property
    def id(self) -> int:
        return self.request.id

    @property
    def is_decode(self) -> bool:
        """One token past the prompt: a decode step, not (re)prefill."""
        return len(self.tokens) == 1 and self.start >= len(self.request.prompt_ids)


@dataclass(frozen=True)
class StepPlan:
    work: tuple[Work, ...] = ()
    release: tuple[int, ...] = ()  # sequence ids whose state can be dropped

    @property
    def size(self) -> int:
        return len(self.work)

    @property
    def tokens(self) -> int:
        return sum(len(w.tokens) for w in self.work)


class GenerationEngine(Protocol):
    kv: KvLayout

    def step(self, plan: StepPlan) -> dict[int, int]: ...


class ClassifierEngine(Protocol):
    """`infer` maps row-major FP32 inputs (n_rows * input_size each) to n_rows * num_classes."""

    input_size: int
    num_classes: int

    def infer(self, batch: Sequence[array[float]]) -> list[array[float]]: ...


def generate_batch(engine: GenerationEngine, requests: Sequence[GenRequest]) -> list[Completion]:
    """Run a whole batch to completion (request-level batching); finished rows drop out.

    Each sequence gets blocks for its whole budget up front; a batch that does not fit in the
    engine's KV memory fails (the runtime sizes it for `batch_size` full-context sequences)."""
    blocks = BlockManager(engine.kv.num_blocks, engine.kv.block_size, prefix_cache=False)
    trackers = {r.id: SequenceTracker(r) for r in requests}
    for tracker in trackers.values():
        tracker.batch_size = len(requests)
    try:
        work = []
        for r in requests:
            if blocks.allocate(r.id, r.prompt_ids + (0,) * r.token_budget) is None:
                raise RuntimeError("the batch does not fit in the engine's KV memory")
            work.append(Work(r, r.prompt_ids, 0, tuple(blocks.table(r.id))))
        plan = StepPlan(tuple(work))
        while plan.size:
            tokens = engine.step(plan)
            work, finished = [], []
            for w in plan.work:
                tracker = trackers[w.id]
                if tracker.push(tokens[w.id]).finish_reason is not None:
                    finished.append(w.id)
                else:
                    start = w.start + len(w.tokens)
                    work.append(Work(w.request, (tracker.token_ids[-1],), start, w.blocks))
            plan = StepPlan(tuple(work), release=tuple(finished))
    finally:
        engine.step(StepPlan(release=tuple(trackers)))
    return [trackers[r.id].completion() for r in requests]

"""The simulated engine: same batchers and API, the forward pass replaced by a timing profile.

It sleeps for the profiled time in the forward-pass thread (so the event loop behaves as with a
real model) and emits deterministic printable tokens seeded by the prompt. No torch import: a
laptop can run many of these replicas.
"""

from __future__ import annotations

import random
import time
import zlib
from array import array
from collections.abc import Callable, Sequence

from replica.engines.base import StepPlan
from replica.engines.profile import ClassifierProfile, GenerationProfile
from replica.models.tokenizer import PRINTABLE


def _rng_for(prompt_ids: tuple[int, ...], seed: int) -> random.Random:
    data = bytes(t % 256 for t in prompt_ids)
    return random.Random(zlib.crc32(data) ^ seed)


class SimulatedGenerationEngine:
    def __init__(
        self, profile: GenerationProfile, sleep: Callable[[float], None] = time.sleep
    ) -> None:
        self.profile = profile
        self._sleep = sleep
        self._rngs: dict[int, random.Random] = {}

    def step(self, plan: StepPlan) -> dict[int, int]:
        for seq_id in plan.release:
            self._rngs.pop(seq_id, None)
        tokens = sum(len(r.prompt_ids) for r in plan.prefill)
        self._sleep(self.profile.step_s(tokens, len(plan.prefill), len(plan.decode)))
        for request in plan.prefill:
            self._rngs[request.id] = _rng_for(request.prompt_ids, request.sampling.seed)
        ids = [r.id for r in plan.prefill] + list(plan.decode)
        return {i: self._rngs[i].choice(PRINTABLE) for i in ids}


class SimulatedClassifierEngine:
    """Logit c of a row is the sum of its inputs at positions i with i % num_classes == c."""

    def __init__(
        self,
        profile: ClassifierProfile,
        input_size: int,
        num_classes: int,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.profile = profile
        self.input_size = input_size
        self.num_classes = num_classes
        self._sleep = sleep

    def infer(self, batch: Sequence[array[float]]) -> list[array[float]]:
        rows = sum(len(item) for item in batch) // self.input_size
        self._sleep(self.profile.forward_s(rows))
        return [self._logits(item) for item in batch]

    def _logits(self, item: array[float]) -> array[float]:
        out = array("f")
        for start in range(0, len(item), self.input_size):
            row = item[start : start + self.input_size]
            out.extend(sum(row[c :: self.num_classes]) for c in range(self.num_classes))
        return out

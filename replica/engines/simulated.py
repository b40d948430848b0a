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

from replica.engines.base import KvLayout, StepPlan
from replica.engines.profile import ClassifierProfile, GenerationProfile
from replica.models.tokenizer import PRINTABLE


def _rng_for(prompt_ids: tuple[int, ...], seed: int) -> random.Random:
    data = bytes(t % 256 for t in prompt_ids)
    return random.Random(zlib.crc32(data) ^ seed)


class SimulatedGenerationEngine:
    """Charges each step for the tokens it computes: prefill (and chunks, and recomputes) per
    token, decode per sequence; a cached prefix is never in the plan, so it costs nothing."""

    def __init__(
        self,
        profile: GenerationProfile,
        sleep: Callable[[float], None] = time.sleep,
        kv: KvLayout | None = None,
    ) -> None:
        self.profile = profile
        self.kv = kv or KvLayout.holding(profile.kv_capacity_tokens, profile.block_size)
        self._sleep = sleep
        self._rngs: dict[int, random.Random] = {}
        self.computed_tokens = 0

    def step(self, plan: StepPlan) -> dict[int, int]:
        for seq_id in plan.release:
            self._rngs.pop(seq_id, None)
        prefill = [w for w in plan.work if not w.is_decode]
        tokens = sum(len(w.tokens) for w in prefill)
        self.computed_tokens += plan.tokens
        self._sleep(self.profile.step_s(tokens, len(prefill), plan.size - len(prefill)))
        out = {}
        for w in plan.work:
            rng = self._rngs.get(w.id)
            if rng is None:
                request = w.request
                rng = self._rngs[w.id] = _rng_for(request.prompt_ids, request.sampling.seed)
            if w.sample:
                out[w.id] = rng.choice(PRINTABLE)
        return out


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

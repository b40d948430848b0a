"""The torch engine: real forward passes of `tiny-gpt` and `classifier` on CPU or CUDA.

Called only from the replica's single forward-pass thread, so per-sequence state needs no lock.
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Sequence

import torch

from replica.config import ClassifierParams, TinyGptParams
from replica.engines.base import KvLayout, StepPlan, Work
from replica.models.classifier import build_classifier
from replica.models.sampling import choose, make_generator
from replica.models.tiny_gpt import KVPool, build_tiny_gpt
from replica.models.tokenizer import PRINTABLE, VOCAB_SIZE


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class TorchGenerationEngine:
    """Runs a plan as one forward pass: decode rows and prefill chunks together, each row at its
    own positions. Greedy rows take one batched argmax; a sampled row samples with its own
    generator, which draws once per position: a preempted sequence's recompute draws only the
    positions it had not reached, so preemption changes no token. `computed_positions` counts
    the token positions the model computed, so tests can see a cached prefix was not."""

    def __init__(
        self, params: TinyGptParams, device: torch.device, kv: KvLayout | None = None
    ) -> None:
        self.model = build_tiny_gpt(params, device)
        self.device = device
        self.kv = kv or KvLayout.holding(32 * params.context_len)
        self.pool = KVPool(self.model, self.kv.num_blocks, self.kv.block_size)
        self._bias = torch.zeros(VOCAB_SIZE, device=device, dtype=self.model.head.weight.dtype)
        if params.ascii_only:
            self._bias.fill_(-math.inf)
            self._bias[list(PRINTABLE)] = 0.0
        else:
            self._bias[VOCAB_SIZE - 1] = -math.inf  # never emit BOS
        self._generators: dict[int, torch.Generator] = {}
        self.computed_positions = 0

    def step(self, plan: StepPlan) -> dict[int, int]:
        for seq_id in plan.release:
            self._generators.pop(seq_id, None)
        if not plan.work:
            return {}
        with torch.inference_mode():
            logits = self.model.forward_chunks(plan.work, self.pool) + self._bias
            greedy = logits.argmax(-1).tolist()
        self.computed_positions += plan.tokens
        out: dict[int, int] = {}
        for row, w in enumerate(plan.work):
            if w.sample:
                sampled = w.request.sampling.temperature > 0
                out[w.id] = self._sample(w, logits[row]) if sampled else greedy[row]
        return out

    def _sample(self, w: Work, logits: torch.Tensor) -> int:
        sampling = w.request.sampling
        generator = self._generators.get(w.id)
        if generator is None:
            generator = self._generators[w.id] = make_generator(sampling.seed, self.device)
        with torch.inference_mode():
            return choose(logits, sampling.temperature, sampling.top_p, generator)


class TorchClassifierEngine:
    def __init__(self, params: ClassifierParams, device: torch.device) -> None:
        self.model = build_classifier(params, device)
        self.device = device
        self.input_size = params.input_size
        self.num_classes = params.num_classes

    def infer(self, batch: Sequence[array[float]]) -> list[array[float]]:
        raw = bytearray(b"".join(item.tobytes() for item in batch))
        x = torch.frombuffer(raw, dtype=torch.float32).view(-1, self.input_size).to(self.device)
        with torch.inference_mode():
            flat = self.model(x).float().cpu().flatten().tolist()
        out, start = [], 0
        for item in batch:
            n = len(item) // self.input_size * self.num_classes
            out.append(array("f", flat[start : start + n]))
            start += n
        return out

"""The torch engine: real forward passes of `tiny-gpt` and `classifier` on CPU or CUDA.

Called only from the replica's single forward-pass thread, so per-sequence state needs no lock.
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from replica.config import ClassifierParams, TinyGptParams
from replica.engines.base import StepPlan
from replica.generation import GenRequest
from replica.models.classifier import build_classifier
from replica.models.sampling import choose, make_generator
from replica.models.tiny_gpt import KVCache, build_tiny_gpt
from replica.models.tokenizer import PRINTABLE, VOCAB_SIZE


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@dataclass(eq=False)
class _Sequence:
    request: GenRequest
    cache: KVCache
    generator: torch.Generator | None
    last_token: int = 0


class TorchGenerationEngine:
    def __init__(self, params: TinyGptParams, device: torch.device) -> None:
        self.model = build_tiny_gpt(params, device)
        self.device = device
        self._bias = torch.zeros(VOCAB_SIZE, device=device)
        if params.ascii_only:
            self._bias.fill_(-math.inf)
            self._bias[list(PRINTABLE)] = 0.0
        else:
            self._bias[VOCAB_SIZE - 1] = -math.inf  # never emit BOS
        self._seqs: dict[int, _Sequence] = {}

    def step(self, plan: StepPlan) -> dict[int, int]:
        for seq_id in plan.release:
            self._seqs.pop(seq_id, None)
        out: dict[int, int] = {}
        with torch.inference_mode():
            if plan.prefill:
                out.update(self._prefill(plan.prefill))
            if plan.decode:
                out.update(self._decode([self._seqs[i] for i in plan.decode]))
        return out

    def _prefill(self, requests: tuple[GenRequest, ...]) -> dict[int, int]:
        logits, caches = self.model.prefill([r.prompt_ids for r in requests])
        out = {}
        for row, (request, cache) in enumerate(zip(requests, caches, strict=True)):
            sampling = request.sampling
            generator = make_generator(sampling.seed, self.device) if sampling.temperature else None
            seq = _Sequence(request, cache, generator)
            self._seqs[request.id] = seq
            out[request.id] = self._choose(seq, logits[row])
        return out

    def _decode(self, seqs: list[_Sequence]) -> dict[int, int]:
        logits = self.model.decode([s.last_token for s in seqs], [s.cache for s in seqs])
        return {s.request.id: self._choose(s, logits[row]) for row, s in enumerate(seqs)}

    def _choose(self, seq: _Sequence, logits: torch.Tensor) -> int:
        sampling = seq.request.sampling
        seq.last_token = choose(
            logits + self._bias, sampling.temperature, sampling.top_p, seq.generator
        )
        return seq.last_token


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

"""Torch models: batching changes no result; sampling is seeded per sequence."""

from __future__ import annotations

from array import array

import pytest
import torch

from replica.config import ClassifierParams, TinyGptParams
from replica.engines.base import StepPlan, Work, generate_batch
from replica.engines.torch_engine import (
    TorchClassifierEngine,
    TorchGenerationEngine,
    resolve_device,
)
from replica.generation import GenRequest, SamplingParams
from replica.models.tokenizer import PRINTABLE, encode

PROMPTS = [("The quick brown fox " * (i % 5 + 1))[: 3 + 7 * i] for i in range(16)]


@pytest.fixture(scope="module")
def engine() -> TorchGenerationEngine:
    return TorchGenerationEngine(TinyGptParams(context_len=256), torch.device("cpu"))


def greedy(prompt: str, max_tokens: int = 12) -> GenRequest:
    return GenRequest(encode(prompt), max_tokens, 256)


def test_greedy_tokens_are_the_same_alone_and_in_a_batch_of_16(
    engine: TorchGenerationEngine,
) -> None:
    alone = [generate_batch(engine, [greedy(p)])[0].token_ids for p in PROMPTS]
    batch = generate_batch(engine, [greedy(p) for p in PROMPTS])
    assert [c.token_ids for c in batch] == alone


class Driver:
    """Drives the engine by hand, as a scheduler would: each sequence's own blocks, each step
    computing what it has not computed yet."""

    def __init__(self, engine: TorchGenerationEngine, *requests: GenRequest) -> None:
        self.engine = engine
        self.ids = {r.id: list(r.prompt_ids) for r in requests}
        self.computed = dict.fromkeys(self.ids, 0)
        self.blocks = {r.id: tuple(range(16 * i, 16 * (i + 1))) for i, r in enumerate(requests)}

    def step(self, *requests: GenRequest, chunk: int | None = None) -> None:
        work = []
        for r in requests:
            start = self.computed[r.id]
            end = len(self.ids[r.id]) if chunk is None else min(start + chunk, len(self.ids[r.id]))
            tokens = tuple(self.ids[r.id][start:end])
            work.append(Work(r, tokens, start, self.blocks[r.id], end == len(self.ids[r.id])))
        out = self.engine.step(StepPlan(tuple(work)))
        for w in work:
            self.computed[w.id] = w.start + len(w.tokens)
            if w.sample:
                self.ids[w.id].append(out[w.id])

    def generated(self, r: GenRequest) -> tuple[int, ...]:
        return tuple(self.ids[r.id][len(r.prompt_ids) :])

    def close(self) -> None:
        self.engine.step(StepPlan(release=tuple(self.ids)))


def test_joining_mid_flight_changes_no_tokens(engine: TorchGenerationEngine) -> None:
    first, second = greedy(PROMPTS[3], 8), greedy(PROMPTS[9], 8)
    expected = generate_batch(engine, [greedy(PROMPTS[9], 8)])[0].token_ids
    drive = Driver(engine, first, second)
    for _ in range(4):
        drive.step(first)
    while len(drive.generated(second)) < 8:
        drive.step(first, second)
    drive.close()
    assert drive.generated(second) == expected


def test_seeded_sampling_repeats_and_ignores_batch_mates(engine: TorchGenerationEngine) -> None:
    def sampled(seed: int) -> GenRequest:
        return GenRequest(encode("hi"), 16, 256, SamplingParams(0.9, 0.95, seed))

    alone = generate_batch(engine, [sampled(7)])[0].token_ids
    mixed = generate_batch(engine, [greedy("abc"), sampled(7), sampled(8)])
    assert mixed[1].token_ids == alone
    assert mixed[2].token_ids != alone


def test_random_weights_emit_printable_bytes_only(engine: TorchGenerationEngine) -> None:
    out = generate_batch(engine, [GenRequest(encode("x"), 64, 256, SamplingParams(1.5, 1.0, 1))])
    assert set(out[0].token_ids) <= set(PRINTABLE)


def test_weights_load_from_a_file(tmp_path: object, engine: TorchGenerationEngine) -> None:
    from pathlib import Path

    path = Path(str(tmp_path)) / "w.pt"
    torch.save(engine.model.state_dict(), path)
    other = TorchGenerationEngine(
        TinyGptParams(context_len=256, seed=99, weights_path=path), torch.device("cpu")
    )
    want = generate_batch(engine, [greedy("load")])[0].token_ids
    assert generate_batch(other, [greedy("load")])[0].token_ids == want


def test_classifier_outputs_match_alone_and_batched_within_1e_4() -> None:
    params = ClassifierParams(input_size=64, hidden_sizes=(128, 128), num_classes=5)
    engine = TorchClassifierEngine(params, torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    items = [array("f", torch.randn(64 * (1 + i % 3), generator=gen).tolist()) for i in range(16)]
    alone = [engine.infer([item])[0] for item in items]
    batched = engine.infer(items)
    for a, b in zip(alone, batched, strict=True):
        assert len(a) == len(b)
        assert max(abs(x - y) for x, y in zip(a, b, strict=True)) < 1e-4


def test_auto_device_is_cuda_only_when_present() -> None:
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected

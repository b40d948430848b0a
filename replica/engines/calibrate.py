"""`replica calibrate`: time the torch engine on this machine and fit a simulated-engine profile.

Prefill time = base + per_token * tokens; decode step = base + per_seq * sequences; classifier
forward = base + per_row * rows. Each point is the median of a few timed repeats; the lines are
least-squares fits.
"""

from __future__ import annotations

import statistics
import time
from array import array
from collections.abc import Callable, Sequence

from replica.config import (
    ClassifierModelConfig,
    ContinuousBatcherConfig,
    ReplicaConfig,
    TinyGptModelConfig,
)
from replica.engines.base import KvLayout, StepPlan, Work
from replica.engines.profile import ClassifierProfile, GenerationProfile, TimingProfile
from replica.engines.torch_engine import (
    TorchClassifierEngine,
    TorchGenerationEngine,
    resolve_device,
)
from replica.generation import GenRequest


def fit_line(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    """Least-squares (intercept, slope), both clamped at 0 (a negative time is noise)."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    var = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var if var else 0.0
    slope = max(slope, 0.0)
    return max(my - slope * mx, 0.0), slope


def _median_s(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def _prompt(length: int, context: int) -> GenRequest:
    return GenRequest(tuple(65 + i % 26 for i in range(length)), 1, context)


def _blocks(engine: TorchGenerationEngine, row: int, tokens: int) -> tuple[int, ...]:
    """Row `row`'s own blocks for `tokens` tokens (calibration owns the whole pool)."""
    per_row = -(-tokens // engine.kv.block_size)
    return tuple(range(row * per_row, (row + 1) * per_row))


def _prefill_s(engine: TorchGenerationEngine, length: int, context: int) -> float:
    def run() -> None:
        request = _prompt(length, context)
        blocks = _blocks(engine, 0, context)
        engine.step(StepPlan((Work(request, request.prompt_ids, 0, blocks),)))
        engine.step(StepPlan(release=(request.id,)))

    return _median_s(run, 5)


def _decode_s(engine: TorchGenerationEngine, seqs: int, context: int) -> float:
    requests = [_prompt(min(64, context // 4), context) for _ in range(seqs)]
    blocks = [_blocks(engine, row, context) for row in range(seqs)]
    engine.step(
        StepPlan(tuple(Work(r, r.prompt_ids, 0, b) for r, b in zip(requests, blocks, strict=True)))
    )
    decode = StepPlan(
        tuple(Work(r, (65,), len(r.prompt_ids), b) for r, b in zip(requests, blocks, strict=True))
    )
    try:
        return _median_s(lambda: engine.step(decode), 10)
    finally:
        engine.step(StepPlan(release=tuple(r.id for r in requests)))


def calibrate_generation(model: TinyGptModelConfig, device: str) -> GenerationProfile:
    context = model.params.context_len
    max_seqs = (
        model.batcher.max_num_seqs if isinstance(model.batcher, ContinuousBatcherConfig) else 16
    )
    layout = KvLayout(max_seqs * -(-context // 16), 16)
    engine = TorchGenerationEngine(model.params, resolve_device(device), kv=layout)
    lengths = sorted({max(2, min(256, context // d)) for d in (16, 8, 4, 2)})
    prefill_base, per_token = fit_line(lengths, [_prefill_s(engine, n, context) for n in lengths])
    sizes = sorted({1, max(1, max_seqs // 4), max(1, max_seqs // 2), max_seqs})
    decode_base, per_seq = fit_line(sizes, [_decode_s(engine, b, context) for b in sizes])
    return GenerationProfile(
        prefill_base_s=prefill_base,
        prefill_s_per_token=per_token,
        decode_base_s=decode_base,
        decode_per_seq_s=per_seq,
        max_num_seqs=max_seqs,
        kv_capacity_tokens=max_seqs * context,
    )


def _infer_fn(engine: TorchClassifierEngine, batch: array[float]) -> Callable[[], object]:
    return lambda: engine.infer([batch])


def calibrate_classifier(model: ClassifierModelConfig, device: str) -> ClassifierProfile:
    engine = TorchClassifierEngine(model.params, resolve_device(device))
    max_rows = model.params.max_rows_per_request
    rows = sorted({1, max(1, max_rows // 8), max(1, max_rows // 2), max_rows})
    row = array("f", [0.5] * model.params.input_size)
    times = [_median_s(_infer_fn(engine, row * n), 10) for n in rows]
    base, per_row = fit_line(rows, times)
    return ClassifierProfile(base_s=base, per_row_s=per_row, max_batch_size=max_rows)


def calibrate(config: ReplicaConfig, name: str) -> TimingProfile:
    gen = next((m for m in config.models if isinstance(m, TinyGptModelConfig)), None)
    cls = next((m for m in config.models if isinstance(m, ClassifierModelConfig)), None)
    gen = gen or TinyGptModelConfig(kind="tiny-gpt")
    cls = cls or ClassifierModelConfig(kind="classifier")
    device = config.engine.device
    where = resolve_device(device)
    return TimingProfile(
        name=name,
        source=f"measured by `replica calibrate` on device '{where}' with the torch engine",
        generation=calibrate_generation(gen, device),
        classifier=calibrate_classifier(cls, device),
    )

"""Builds what the server serves from a `ReplicaConfig`: engines, batchers, one forward thread.

All models share one single-worker executor: like one GPU, the replica runs one forward pass at
a time. torch is imported only when the torch engine is chosen.
"""

from __future__ import annotations

import asyncio
import math
from array import array
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

from replica.api.kserve import TensorSpec
from replica.batching import (
    Batcher,
    ContinuousBatcher,
    DynamicBatcher,
    Load,
    NoBatcher,
    QueueKnobs,
    StaticBatcher,
)
from replica.batching.clock import Clock
from replica.batching.continuous import SHARED_SLICE_S, KvEvents
from replica.batching.observer import BatchObserver
from replica.config import (
    BatcherConfig,
    ClassifierModelConfig,
    ContinuousBatcherConfig,
    DynamicBatcherConfig,
    EngineConfig,
    NoneBatcherConfig,
    ReplicaConfig,
    StaticBatcherConfig,
    TinyGptModelConfig,
    keeps_prefix_cache,
)
from replica.engines.base import ClassifierEngine, GenerationEngine, KvLayout, generate_batch
from replica.engines.profile import GenerationProfile
from replica.generation import Completion, GenRequest
from replica.kv_events import KvEventPublisher, open_publisher
from replica.metrics import ModelMetrics, ReplicaMetrics

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class GenerativeModel:
    name: str
    config: TinyGptModelConfig
    batcher: Batcher[GenRequest, Completion]
    metrics: ModelMetrics
    kv_events: KvEventPublisher | None = None  # publishes its prefix cache's events

    @property
    def context_len(self) -> int:
        return self.config.params.context_len


@dataclass(frozen=True)
class ClassifierModel:
    name: str
    config: ClassifierModelConfig
    batcher: Batcher[array[float], array[float]]
    metrics: ModelMetrics
    spec: TensorSpec


ServedModel = GenerativeModel | ClassifierModel


class Runtime:
    def __init__(self, models: dict[str, ServedModel], executor: ThreadPoolExecutor) -> None:
        self.models = models
        self.executor = executor

    def load(self) -> Load:
        loads = [m.batcher.load() for m in self.models.values()]
        return Load(
            queued=sum(x.queued for x in loads),
            running=sum(x.running for x in loads),
            capacity=sum(x.capacity for x in loads),
            backlog_tokens=sum(x.backlog_tokens for x in loads),
            kv_usage=max((x.kv_usage for x in loads), default=0.0),  # the fullest model's
        )

    async def close(self) -> None:
        await asyncio.gather(*(m.batcher.close() for m in self.models.values()))
        for model in self.models.values():
            if isinstance(model, GenerativeModel) and model.kv_events is not None:
                await asyncio.to_thread(model.kv_events.close)
        self.executor.shutdown(wait=True)


def request_batcher(
    config: BatcherConfig,
    forward: Callable[[Sequence[T]], Sequence[R]],
    *,
    executor: Executor,
    observer: BatchObserver,
    clock: Clock | None = None,
) -> Batcher[T, R]:
    common: dict[str, Any] = {
        "executor": executor,
        "observer": observer,
        "clock": clock,
        "knobs": QueueKnobs(config.max_queue, config.queue_timeout_ms / 1000),
    }
    match config:
        case NoneBatcherConfig():
            return NoBatcher(forward, **common)
        case StaticBatcherConfig():
            wait_s = None if config.max_wait_ms is None else config.max_wait_ms / 1000
            return StaticBatcher(forward, batch_size=config.batch_size, max_wait_s=wait_s, **common)
        case DynamicBatcherConfig():
            wait_s = config.max_wait_ms / 1000
            return DynamicBatcher(
                forward, max_batch_size=config.max_batch_size, max_wait_s=wait_s, **common
            )
    raise ValueError(f"batcher '{config.kind}' is not a request-level batcher")


def generation_batcher(
    config: BatcherConfig,
    engine: GenerationEngine,
    *,
    executor: Executor,
    observer: BatchObserver,
    clock: Clock | None = None,
    max_num_seqs_cap: int | None = None,
    kv_events: KvEvents | None = None,
    slice_s: float = SHARED_SLICE_S,
) -> Batcher[GenRequest, Completion]:
    if not isinstance(config, ContinuousBatcherConfig):
        forward = partial(generate_batch, engine)
        return request_batcher(config, forward, executor=executor, observer=observer, clock=clock)
    max_num_seqs = min(config.max_num_seqs, max_num_seqs_cap or config.max_num_seqs)
    return ContinuousBatcher(
        engine,
        executor=executor,
        max_num_seqs=max_num_seqs,
        max_batch_tokens=max(config.max_batch_tokens, max_num_seqs),
        prefix_cache=config.prefix_cache.enabled,
        knobs=QueueKnobs(config.max_queue, config.queue_timeout_ms / 1000),
        observer=observer,
        clock=clock,
        kv_events=kv_events,
        slice_s=slice_s,
    )


def kv_layout(
    batcher: BatcherConfig, context_len: int, profile: GenerationProfile | None = None
) -> KvLayout:
    """KV memory for one model. Continuous: `kv_capacity_tokens`, else the simulated profile's
    capacity, else `max_num_seqs` full contexts. Request-level batchers hold whole sequences
    for a whole batch, so they get room for a full batch of full contexts."""
    default_block = profile.block_size if profile else 16
    if isinstance(batcher, ContinuousBatcherConfig):
        block = batcher.prefix_cache.block_size or default_block
        tokens = batcher.kv_capacity_tokens or (
            profile.kv_capacity_tokens if profile else batcher.max_num_seqs * context_len
        )
        return KvLayout.holding(tokens, block)
    match batcher:
        case StaticBatcherConfig():
            rows = batcher.batch_size
        case DynamicBatcherConfig():
            rows = batcher.max_batch_size
        case _:
            rows = 1
    return KvLayout(rows * -(-context_len // default_block), default_block)


def _with_faults(engine: EngineConfig, gen: GenerationEngine) -> GenerationEngine:
    if engine.fail_every_n_steps is None:
        return gen
    from replica.engines.faults import FailingEngine

    return FailingEngine(gen, engine.fail_every_n_steps)


def _generation_engine(engine: EngineConfig, model: TinyGptModelConfig) -> GenerationEngine:
    context = model.params.context_len
    if engine.kind == "simulated":
        from replica.engines.profile import load_profile
        from replica.engines.simulated import SimulatedGenerationEngine

        profile = load_profile(engine.profile_path).generation
        layout = kv_layout(model.batcher, context, profile)
        return SimulatedGenerationEngine(profile, kv=layout)
    from replica.engines.torch_engine import TorchGenerationEngine, resolve_device

    layout = kv_layout(model.batcher, context)
    return TorchGenerationEngine(model.params, resolve_device(engine.device), kv=layout)


def _classifier_engine(engine: EngineConfig, model: ClassifierModelConfig) -> ClassifierEngine:
    p = model.params
    if engine.kind == "simulated":
        from replica.engines.profile import load_profile
        from replica.engines.simulated import SimulatedClassifierEngine

        profile = load_profile(engine.profile_path).classifier
        return SimulatedClassifierEngine(profile, p.input_size, p.num_classes)
    from replica.engines.torch_engine import TorchClassifierEngine, resolve_device

    return TorchClassifierEngine(p, resolve_device(engine.device))


def _configure_torch(engine: EngineConfig) -> None:
    if engine.kind == "torch" and engine.torch_threads is not None:
        import torch

        torch.set_num_threads(engine.torch_threads)


def _track(observer: ModelMetrics, batcher: Batcher[Any, Any], max_queue: int) -> None:
    observer.track_load(lambda: batcher.load().queued, lambda: batcher.load().running, max_queue)
    if isinstance(batcher, ContinuousBatcher):
        observer.track_kv(batcher.blocks.stats)


def build_runtime(
    config: ReplicaConfig, metrics: ReplicaMetrics, clock: Clock | None = None
) -> Runtime:
    """Load every model (slow: call it off the event loop) and put a batcher in front of each."""
    _configure_torch(config.engine)
    publisher = open_publisher(config.kv_events)  # config: then exactly one model keeps a cache
    try:
        return _build(config, metrics, clock, publisher)
    except BaseException:
        if publisher is not None:
            publisher.close()
        raise


def _build(
    config: ReplicaConfig,
    metrics: ReplicaMetrics,
    clock: Clock | None,
    publisher: KvEventPublisher | None,
) -> Runtime:
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="forward")
    models: dict[str, ServedModel] = {}
    for model in config.models:
        observer = metrics.for_model(model.name)
        served: ServedModel
        if isinstance(model, TinyGptModelConfig):
            gen = _generation_engine(config.engine, model)
            cap = getattr(getattr(gen, "profile", None), "max_num_seqs", None)
            events = publisher if keeps_prefix_cache(model) else None
            batcher = generation_batcher(
                model.batcher, _with_faults(config.engine, gen), executor=executor,
                observer=observer, clock=clock, max_num_seqs_cap=cap,
                kv_events=None if events is None else events.publish,
                slice_s=SHARED_SLICE_S if len(config.models) > 1 else math.inf,
            )  # fmt: skip
            served = GenerativeModel(model.name, model, batcher, observer, events)
        else:
            cls = _classifier_engine(config.engine, model)
            spec = TensorSpec(cls.input_size, cls.num_classes, model.params.max_rows_per_request)
            forward = cls.infer
            batcher_c = request_batcher(
                model.batcher, forward, executor=executor, observer=observer, clock=clock
            )
            served = ClassifierModel(model.name, model, batcher_c, observer, spec)
        _track(observer, served.batcher, model.batcher.max_queue)
        models[model.name] = served
    return Runtime(models, executor)

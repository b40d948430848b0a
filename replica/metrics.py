"""All replica Prometheus metrics, declared once against a registry passed in (tests isolate).

Label `model` is bounded by the config; `reason` by the rejection kinds.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from replica.kv import CacheStats

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class ReplicaMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.queue_wait = Histogram(
            "replica_queue_wait_seconds", "Time a request waited before dispatch", ["model"],
            registry=registry, buckets=_LATENCY_BUCKETS,
        )  # fmt: skip
        self.batch_size = Histogram(
            "replica_batch_size", "Requests (or sequences) per forward pass", ["model"],
            registry=registry, buckets=_BATCH_BUCKETS,
        )  # fmt: skip
        self.compute = Histogram(
            "replica_compute_seconds", "Forward pass (or decode step) time", ["model"],
            registry=registry, buckets=_LATENCY_BUCKETS,
        )  # fmt: skip
        self.ttft = Histogram(
            "replica_ttft_seconds", "Arrival to first generated token", ["model"],
            registry=registry, buckets=_LATENCY_BUCKETS,
        )  # fmt: skip
        self.tpot = Histogram(
            "replica_tpot_seconds", "Mean time per output token after the first, per request",
            ["model"], registry=registry, buckets=_LATENCY_BUCKETS,
        )  # fmt: skip
        self.queue_depth = Gauge(
            "replica_queue_depth", "Requests waiting in the queue", ["model"], registry=registry
        )
        self.queue_capacity = Gauge(
            "replica_queue_capacity", "Most requests the queue holds (max_queue); past it, 429",
            ["model"], registry=registry,
        )  # fmt: skip
        self.running = Gauge(
            "replica_running_sequences", "Requests or sequences in the forward pass", ["model"],
            registry=registry,
        )  # fmt: skip
        self.rejections = Counter(
            "replica_rejections_total", "Requests refused by the queue", ["model", "reason"],
            registry=registry,
        )  # fmt: skip
        self.idempotent_replays = Counter(
            "replica_idempotent_replays_total",
            "Answers sent again for a repeated Idempotency-Key, without running the model",
            registry=registry,
        )
        self.requests = Counter(
            "replica_requests_total", "HTTP requests by endpoint and status class",
            ["endpoint", "status"], registry=registry,
        )  # fmt: skip

        self.kv = _KvCollector()
        registry.register(self.kv)

    def for_model(self, model: str) -> ModelMetrics:
        return ModelMetrics(self, model)


class _KvCollector(Collector):
    """KV memory and prefix-cache counts, read from each continuous batcher at scrape time."""

    def __init__(self) -> None:
        self.sources: dict[str, Callable[[], CacheStats]] = {}

    def collect(self) -> Iterator[Metric]:
        queried = CounterMetricFamily(
            "replica_prefix_cache_queried_tokens",
            "Prompt tokens looked up in the prefix cache", labels=["model"],
        )  # fmt: skip
        hits = CounterMetricFamily(
            "replica_prefix_cache_hit_tokens",
            "Prompt tokens found in the prefix cache (not computed again)", labels=["model"],
        )  # fmt: skip
        preemptions = CounterMetricFamily(
            "replica_preemptions",
            "Sequences preempted for KV memory (freed, recomputed later)", labels=["model"],
        )  # fmt: skip
        usage = GaugeMetricFamily(
            "replica_kv_cache_usage_ratio", "Share of KV blocks held by sequences, 0-1",
            labels=["model"],
        )  # fmt: skip
        for model, read in self.sources.items():
            stats = read()
            queried.add_metric([model], stats.queried_tokens)
            hits.add_metric([model], stats.hit_tokens)
            preemptions.add_metric([model], stats.preemptions)
            usage.add_metric([model], stats.usage)
        yield from (queried, hits, preemptions, usage)


class ModelMetrics:
    """The `BatchObserver` for one model, plus per-request generation timings."""

    def __init__(self, metrics: ReplicaMetrics, model: str) -> None:
        self._m = metrics
        self._model = model

    def on_dispatch(self, queue_wait_s: float) -> None:
        self._m.queue_wait.labels(self._model).observe(queue_wait_s)

    def on_batch(self, size: int, compute_s: float) -> None:
        self._m.batch_size.labels(self._model).observe(size)
        self._m.compute.labels(self._model).observe(compute_s)

    def on_reject(self, reason: str) -> None:
        self._m.rejections.labels(self._model, reason).inc()

    def on_generation(self, ttft_s: float, tpot_s: float | None) -> None:
        self._m.ttft.labels(self._model).observe(ttft_s)
        if tpot_s is not None:
            self._m.tpot.labels(self._model).observe(tpot_s)

    def track_kv(self, stats: Callable[[], CacheStats]) -> None:
        self._m.kv.sources[self._model] = stats

    def track_load(
        self, queued: Callable[[], int], running: Callable[[], int], max_queue: int
    ) -> None:
        self._m.queue_capacity.labels(self._model).set(max_queue)
        self._m.queue_depth.labels(self._model).set_function(queued)
        self._m.running.labels(self._model).set_function(running)

"""Prometheus metrics of one gateway process, declared against a registry passed in.

Per-replica gauges (outstanding, healthy) are read from the pool at scrape time by a collector,
so the pool stays the one owner of that state and a scrape never sees a stale copy. Request
counts are labelled by status class (`code="2xx"`, as the replica's metrics) and API key name.

With `workers: N`, the pool publishes each worker's per-replica totals (requests, errors,
ejections) to the shared counts at every request's end (ReplicaPool.publish_totals), so
/admin/replicas and the status page show the whole gateway's, as /metrics does.

Per-replica series are bounded by the pool: when DNS discovery or a reload replaces replicas,
the series of those that left (no longer active nor draining) are dropped (`forget_gone`)
whenever the pool's replicas change and when a new replica's first request is observed.

The metrics subscribe (`watch`): to admission's `lease_closed`, the pool's `changed`, the
runtime `swapped` by a reload, and the proxy's events (GatewayMetrics is the ProxyEvents the
proxy reports to). Nothing below calls this module. A lease's end also feeds the status page's
charts (gateway/ops/history.py) and recent decisions (gateway/ops/decisions.py).
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Sequence

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram, Info
from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from gateway.datapath.proxy import ProxyEvents
from gateway.flow.queue import Ticket
from gateway.flow.service import Usage
from gateway.ops.decisions import RecentDecisions
from gateway.ops.flow_metrics import FlowMetrics
from gateway.ops.history import History, read_gauges
from gateway.ops.kv_metrics import KvEventsMetrics
from gateway.ops.recent import RecentTraffic
from gateway.pool.admission import Admission
from gateway.pool.lease import Lease
from gateway.pool.live import Live, Runtime
from gateway.pool.replicas import ReplicaPool

# Inference requests run from milliseconds (classifiers) to minutes (long generations).
LATENCY_BUCKETS_S = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
)  # fmt: skip


class PoolCollector(Collector):
    def __init__(self, pool: ReplicaPool, admission: Admission) -> None:
        self._pool = pool
        self._admission = admission

    def collect(self) -> Iterator[GaugeMetricFamily]:
        outstanding = GaugeMetricFamily(
            "gateway_outstanding_requests",
            "Requests dispatched to a replica and not yet fully relayed.",
            labels=["replica"],
        )
        healthy = GaugeMetricFamily(
            "gateway_replica_healthy", "1 when the replica takes new requests.", labels=["replica"]
        )
        ejected = GaugeMetricFamily(
            "gateway_replica_ejected", "1 while outlier detection keeps it out.", labels=["replica"]
        )
        for replica in self._pool.all():
            outstanding.add_metric([replica.url], replica.busy)
            healthy.add_metric([replica.url], int(replica.healthy and not replica.draining))
            ejected.add_metric([replica.url], int(replica.ejected_until > 0))
        yield outstanding
        yield healthy
        yield ejected
        serving = GaugeMetricFamily(
            "gateway_model_replicas",
            "Replicas in rotation that list the model on GET /v1/models (or in the config).",
            labels=["model"],
        )
        for model in self._pool.catalog():
            serving.add_metric([model], len(self._pool.available_for(model)))
        yield serving
        yield GaugeMetricFamily(
            "gateway_queue_depth",
            "Requests waiting at the gateway for a free replica slot.",
            value=self._admission.queued_everywhere(),
        )


class StrategyCollector(Collector):
    """`gateway_routing_strategy_info` from the live strategy (prometheus-client's Info does
    not work in multiprocess mode)."""

    def __init__(self, metrics: GatewayMetrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[InfoMetricFamily]:
        info = InfoMetricFamily("gateway_routing_strategy", "The routing strategy in force.")
        info.add_metric([], {"strategy": self._metrics.strategy_name})
        yield info


class GatewayMetrics(ProxyEvents):
    """With `multiprocess_dir` (`workers: N`), counters and histograms are written to files
    there by every worker and `exposition` sums them (prometheus-client's multiprocess mode);
    the per-replica gauges come from the shared counts, the same in every worker."""

    def __init__(
        self,
        registry: CollectorRegistry,
        pool: ReplicaPool,
        admission: Admission,
        multiprocess_dir: str | None = None,
    ) -> None:
        self.registry = registry
        self.multiprocess = multiprocess_dir is not None
        self.strategy_name = ""
        self.requests = Counter(
            "gateway_requests",
            "Proxied requests by replica, status class (2xx..5xx; a client that went away is "
            "4xx) and API key name ('' without auth).",
            ["replica", "code", "key"],
            registry=registry,
        )
        self.duration = Histogram(
            "gateway_request_duration_seconds",
            "Dispatch to last byte relayed, per replica.",
            ["replica"],
            buckets=LATENCY_BUCKETS_S,
            registry=registry,
        )
        self.strategy = Info(
            "gateway_routing_strategy", "The routing strategy in force.", registry=registry
        )
        self.reloads = Counter(
            "gateway_config_reloads", "Config reload attempts by result.", ["result"],
            registry=registry,
        )  # fmt: skip
        self.unrouted_requests = Counter(
            "gateway_unrouted_requests",
            "Requests answered by the gateway without reaching a replica, by reason.",
            ["reason"],
            registry=registry,
        )
        self.lean_requests = Counter(
            "gateway_lean_requests",
            "Proxied requests served by the lean front (gateway/app/front.py).",
            registry=registry,
        )
        self.handoffs = Counter(
            "gateway_front_handoffs",
            "Connections the lean front handed to aiohttp's server, by why: a path the gateway "
            "owns ('path') or any other request it leaves to aiohttp ('request').",
            ["reason"],
            registry=registry,
        )
        self.retries = Counter(
            "gateway_retries",
            "Requests sent again to another replica, by what failed.",
            ["reason"],
            registry=registry,
        )
        self.retries_refused = Counter(
            "gateway_retries_refused",
            "Retries not made because the retry budget was spent.",
            registry=registry,
        )
        self.ejections = Counter(
            "gateway_ejections", "Outlier-detection ejections.", ["replica"], registry=registry
        )
        self.discovery = Counter(
            "gateway_discovery_resolutions",
            "DNS discovery rounds by result; an error keeps the last good replica list.",
            ["result"],
            registry=registry,
        )
        self.jobs_finished = Counter(
            "gateway_jobs_finished",
            "Deferred jobs whose result a dispatch recorded, by status (succeeded, failed).",
            ["status"],
            registry=registry,
        )
        self.job_retries = Counter(
            "gateway_job_retries",
            "Job dispatches that failed on a replica and were queued again.",
            registry=registry,
        )
        self.model_requests = Counter(
            "gateway_model_requests",
            "Proxied requests by served model (only models a replica lists; 'other' for a model "
            "sent to a replica that lists none) and status class.",
            ["model", "code"],
            registry=registry,
        )
        registry.register(PoolCollector(pool, admission))
        self.exposition = registry  # what GET /metrics shows
        if multiprocess_dir is not None:
            self.exposition = CollectorRegistry()
            MultiProcessCollector(self.exposition, path=multiprocess_dir)  # type: ignore[no-untyped-call]
            self.exposition.register(PoolCollector(pool, admission))
            self.exposition.register(StrategyCollector(self))
        self._pool = pool
        self.flow = FlowMetrics(registry)  # queue, shedding, tenants' tokens, limit refusals
        self.kv = KvEventsMetrics(registry)  # the KV cache event feed
        self.recent = RecentTraffic()  # rate and latency over the last seconds, for /ui
        self.history = History(lambda: read_gauges(pool, admission))  # /ui's charts
        self.decisions = RecentDecisions()  # /ui's last routing decisions
        self._counters: dict[tuple[str, str, str], Counter] = {}
        self._histograms: dict[str, Histogram] = {}
        self._model_counters: dict[tuple[str, str], Counter] = {}

    def watch(self, live: Live) -> None:
        """Subscribe to the gateway's signals."""
        live.admission.lease_closed.append(self.lease_closed)
        live.pool.changed.append(self.forget_gone)
        live.swapped.append(self.swapped)
        self.flow.watch(live)
        queued = self.flow.collector(live.admission, live)
        self.registry.register(queued)
        if self.exposition is not self.registry:
            self.exposition.register(queued)

    def settled(self, ticket: Ticket, usage: Usage | None) -> None:
        self.flow.settled(ticket, usage)

    def rate_limited(self, tenant: str, code: str) -> None:
        self.flow.rate_limited(tenant, code)

    def lease_closed(self, lease: Lease, elapsed_s: float, ejected: bool) -> None:
        if ejected:
            self.ejections.labels(lease.replica.url).inc()
        self.observe(lease.replica.url, lease.code, elapsed_s, lease.key, lease.model)
        self.decisions.add(lease, elapsed_s)
        self.history.finished(elapsed_s)

    def swapped(self, runtime: Runtime) -> None:
        self.set_strategy(runtime.config.routing.strategy)

    def unrouted(self, reason: str) -> None:
        self.unrouted_requests.labels(reason).inc()

    def retried(self, reason: str) -> None:
        self.retries.labels(reason).inc()

    def retry_refused(self) -> None:
        self.retries_refused.inc()

    def discovery_round(self, result: str) -> None:
        self.discovery.labels(result).inc()

    def observe(
        self, replica: str, code: int, duration_s: float, key: str = "", model: str = ""
    ) -> None:
        """One attempt's end: the status the client got (499 when it left), the API key and the
        served model ('' for a request that named none)."""
        if model:
            model_labels = (model if model in self._pool.catalog() else "other", status_class(code))
            child = self._model_counters.get(model_labels)
            if child is None:
                child = self._model_counters[model_labels] = self.model_requests.labels(
                    *model_labels
                )
            child.inc()
        # Children are cached: prometheus_client's labels() takes a lock and builds a key.
        histogram = self._histograms.get(replica)
        if histogram is None:
            histogram = self._first_of(replica)
        labels = (replica, status_class(code), key)
        counter = self._counters.get(labels)
        if counter is None:
            counter = self._counters[labels] = self.requests.labels(*labels)
        counter.inc()
        histogram.observe(duration_s)
        self.recent.add(replica, duration_s)

    def _first_of(self, replica: str) -> Histogram:
        if len(self._histograms) >= len(self._pool.all()):
            self.forget_gone(also_keep=replica)  # it may have drained just before this call
        histogram = self._histograms[replica] = self.duration.labels(replica)
        return histogram

    def set_strategy(self, name: str) -> None:
        self.strategy_name = name
        self.strategy.info({"strategy": name})

    def forget_gone(self, also_keep: str | None = None) -> None:
        """Drop every per-replica series of replicas no longer in the pool (not in multiprocess
        mode, which cannot remove a series: there they stay until the gateway restarts)."""
        keep = {replica.url for replica in self._pool.all()}
        if also_keep is not None:
            keep.add(also_keep)
        for labels in [labels for labels in self._counters if labels[0] not in keep]:
            del self._counters[labels]
        for url in [url for url in self._histograms if url not in keep]:
            del self._histograms[url]
        self.recent.keep_only(keep)
        if self.multiprocess:
            return
        _remove_replicas(self.requests, ("replica", "code", "key"), keep)
        _remove_replicas(self.duration, ("replica",), keep)
        _remove_replicas(self.ejections, ("replica",), keep)


def status_class(code: int) -> str:
    """200 -> '2xx': a bounded label, the same convention as the replica's metrics."""
    return f"{code // 100}xx"


def _remove_replicas(
    metric: MetricWrapperBase, labelnames: Sequence[str], keep: Collection[str]
) -> None:
    stale = {
        tuple(sample.labels[name] for name in labelnames)
        for family in metric.collect()
        for sample in family.samples
        if sample.labels["replica"] not in keep
    }
    for labels in stale:
        metric.remove(*labels)


METRICS = web.AppKey("metrics", GatewayMetrics)

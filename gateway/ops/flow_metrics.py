"""Prometheus metrics of flow control and tenancy: requests queued by class and tenant, the time
they waited, those shed and why, tokens served per tenant and kind, limit refusals.

Tenant labels are bounded: a tenant named by a configured key (and `default`) is its own label,
any other (an `X-Infergate-Tenant` header's) is `other`. Class labels come from the config
(`all` without flow control). It subscribes to admission's `dequeued` and the runtime's
`swapped`; the proxy's events reach it through GatewayMetrics.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from gateway.config import FlowClass
from gateway.flow.identity import DEFAULT_TENANT
from gateway.flow.queue import JOBS, Ticket
from gateway.flow.service import Usage
from gateway.pool.admission import Admission
from gateway.pool.live import Live, Runtime

OTHER = "other"
ALL_CLASSES = "all"
WAIT_BUCKETS_S = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class FlowMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.wait = Histogram(
            "gateway_queue_wait_seconds",
            "Seconds requests waited in the gateway queue before a replica slot, by class.",
            ["class"],
            buckets=WAIT_BUCKETS_S,
            registry=registry,
        )
        self.shed = Counter(
            "gateway_shed_requests",
            "Requests the gateway queue let go without a slot, by class and reason "
            "(ttl-expired, evicted, queue-full).",
            ["class", "reason"],
            registry=registry,
        )
        self.tokens = Counter(
            "gateway_tenant_tokens",
            "Tokens served per tenant, by kind (prompt, completion), from the responses' usage "
            "(or a stream's events).",
            ["tenant", "kind"],
            registry=registry,
        )
        self.refused = Counter(
            "gateway_rate_limited_requests",
            "Requests refused by their key's limits, by tenant and limit (requests, tokens, "
            "parallel_requests, request_too_large).",
            ["tenant", "code"],
            registry=registry,
        )
        self.store_errors = Counter(
            "gateway_limits_store_errors",
            "Round trips to the limits store (flow_control.store) that failed: refused, timed "
            "out or an error of the database.",
            registry=registry,
        )
        self.tenants: frozenset[str] = frozenset({DEFAULT_TENANT})

    def watch(self, live: Live) -> None:
        live.admission.dequeued.append(self.dequeued)
        live.swapped.append(self.swapped)

    def collector(self, admission: Admission, live: Live) -> Collector:
        return QueueCollector(admission, live, self)

    def swapped(self, runtime: Runtime) -> None:
        auth = runtime.config.auth
        keys = auth.api_keys if auth is not None else ()
        self.tenants = frozenset({DEFAULT_TENANT, *(key.tenant_name for key in keys)})

    def label(self, tenant: str) -> str:
        return tenant if tenant in self.tenants else OTHER

    def dequeued(self, ticket: Ticket, waited_s: float, how: str) -> None:
        name = ticket.class_name or ALL_CLASSES
        if how == "dispatched":
            self.wait.labels(name).observe(waited_s)
        elif how != "left":
            self.shed.labels(name, how).inc()

    def settled(self, ticket: Ticket, usage: Usage | None) -> None:
        if usage is None or not (usage.prompt or usage.completion):
            return
        tenant = self.label(ticket.tenant)
        self.tokens.labels(tenant, "prompt").inc(usage.prompt)
        self.tokens.labels(tenant, "completion").inc(usage.completion)

    def rate_limited(self, tenant: str, code: str) -> None:
        self.refused.labels(self.label(tenant), code).inc()


class QueueCollector(Collector):
    """`gateway_queued_requests` by class and tenant, read from admission at scrape time (with
    `workers: N`, the worker that answers the scrape: each worker has its own queue)."""

    def __init__(self, admission: Admission, live: Live, metrics: FlowMetrics) -> None:
        self._admission, self._live, self._metrics = admission, live, metrics

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "gateway_queued_requests",
            "Requests waiting at the gateway for a replica slot, by class and tenant.",
            labels=["class", "tenant"],
        )
        flow = self._live.runtime.config.flow_control
        sums: dict[tuple[str, str], int] = {}
        for (rank, tenant), count in self._admission.waiting().items():
            name = ALL_CLASSES if flow is None else _class_name(flow.classes, rank)
            label = (name, self._metrics.label(tenant))
            sums[label] = sums.get(label, 0) + count
        for labels, count in sums.items():
            family.add_metric(list(labels), count)
        yield family


def _class_name(classes: Sequence[FlowClass], rank: int) -> str:
    return classes[rank].name if rank < len(classes) else JOBS

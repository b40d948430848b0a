"""Gateway request metrics: status classes and API key labels, and per-replica series that stay
bounded by the pool when replicas come and go."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from gateway.ops.metrics import GatewayMetrics, status_class
from gateway.pool.admission import Admission
from gateway.pool.replicas import ReplicaPool

A, B, C = "http://a:1", "http://b:1", "http://c:1"


def _metrics(*urls: str) -> tuple[GatewayMetrics, ReplicaPool]:
    pool = ReplicaPool(urls)
    return GatewayMetrics(CollectorRegistry(), pool, Admission(pool)), pool


def _requests(metrics: GatewayMetrics, **labels: str) -> float | None:
    return metrics.registry.get_sample_value("gateway_requests_total", labels)


def _replicas(metrics: GatewayMetrics) -> set[str]:
    """Every replica named by a sample of the registry, or by a recent-traffic window."""
    named = {
        sample.labels["replica"]
        for family in metrics.registry.collect()
        for sample in family.samples
        if "replica" in sample.labels
    }
    return named | set(metrics.recent.replicas())


def test_requests_are_counted_by_status_class_and_key() -> None:
    metrics, _ = _metrics(A)
    for code in (200, 204, 404, 499, 503):
        metrics.observe(A, code, 0.01, key="team-a")
    metrics.observe(A, 200, 0.01)
    assert _requests(metrics, replica=A, code="2xx", key="team-a") == 2.0
    assert _requests(metrics, replica=A, code="4xx", key="team-a") == 2.0  # 499: client left
    assert _requests(metrics, replica=A, code="5xx", key="team-a") == 1.0
    assert _requests(metrics, replica=A, code="2xx", key="") == 1.0
    assert [status_class(c) for c in (101, 302, 429)] == ["1xx", "3xx", "4xx"]


def test_series_of_replicas_that_left_the_pool_are_dropped() -> None:
    metrics, pool = _metrics(A, B)
    for url in (A, B):
        metrics.observe(url, 200, 0.01)
    metrics.ejections.labels(A).inc()
    pool.update([B, C])  # A leaves with nothing outstanding
    metrics.forget_gone()
    assert _replicas(metrics) == {B, C}  # C: the pool's gauges, read from the pool itself
    assert _requests(metrics, replica=B, code="2xx", key="") == 1.0  # kept as it was


def test_the_first_request_of_a_new_replica_prunes_without_discovery() -> None:
    metrics, pool = _metrics(A)
    metrics.observe(A, 200, 0.01)
    for url in (B, C):  # static reloads replacing the one replica, each then used
        pool.update([url])
        metrics.observe(url, 200, 0.01)
    assert _replicas(metrics) == {C}


def test_a_replica_observed_as_it_drains_away_is_counted() -> None:
    metrics, pool = _metrics(A)
    pool.update([])  # A already gone from the pool when its last request is observed
    metrics.observe(A, 200, 0.01)
    assert _requests(metrics, replica=A, code="2xx", key="") == 1.0

"""Prometheus metrics of the KV cache event feed (gateway/control/kv_events.py): what each
replica's publishers sent and what became of it (`gateway_kv_events_total` by replica and
`event`), and, read from the feed at scrape time, the blocks the gateway knows each replica
holds and how late its newest batch arrived. With `workers: N` every worker follows the
publishers itself: the counters sum the workers', the gauges are the scraped worker's."""

from __future__ import annotations

import math
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from gateway.control.kv_events import FeedEvents, KvEventsFeed


class KvEventsMetrics(FeedEvents):
    def __init__(self, registry: CollectorRegistry) -> None:
        self.events = Counter(
            "gateway_kv_events",
            "KV cache event feed, by replica and what happened: batches applied, gaps, replays "
            "(and replays_failed), restarts, disconnects, resyncs (what was held dropped after "
            "lost events), decode_errors, rejected_events, and blocks not indexed: "
            "orphan_blocks (parent unknown), foreign_blocks (another block size), dropped_blocks "
            "(over max_entries).",
            ["replica", "event"],
            registry=registry,
        )

    def counted(self, replica: str, what: str, n: int = 1) -> None:
        self.events.labels(replica, what).inc(n)

    def collector(self, feed: KvEventsFeed) -> Collector:
        return _FeedCollector(feed)


class _FeedCollector(Collector):
    def __init__(self, feed: KvEventsFeed) -> None:
        self._feed = feed

    def collect(self) -> Iterator[GaugeMetricFamily]:
        blocks = GaugeMetricFamily(
            "gateway_kv_events_blocks",
            "Blocks the gateway knows the replica holds (every rank and tier), from its events.",
            labels=["replica"],
        )
        lag = GaugeMetricFamily(
            "gateway_kv_events_lag_seconds",
            "From the newest event batch's timestamp to its arrival (its ranks' worst).",
            labels=["replica"],
        )
        for url in sorted({url for url, _ in self._feed.followers}):
            blocks.add_metric([url], self._feed.held(url))
            late = self._feed.lag_s(url)
            if not math.isnan(late):
                lag.add_metric([url], late)
        yield blocks
        yield lag

"""Load feedback by polling: every `load_feedback.poll_interval_s`, each replica's load.

With `source: infergate` that is GET /load (JSON, our replica); replicas also report their load
on every response (X-Replica-Load, read by the proxy), but a replica this gateway has not sent
to lately would go unheard, so the poll keeps every report fresh and `least_loaded` sees
requests that other gateway instances sent. With `vllm`, `sglang`, `tgi` or `prometheus` it is
a scrape of GET /metrics read as gateway/control/engines.py says. A failed poll costs only that
replica's report (the last one ages out after `max_age_s`) and one log line when its polls
start failing: health checks and outlier detection deal with broken replicas. Bodies are read
with a cap, and values by pool.load_report's rule (whole counts, a share from 0 to 1); the
probe's loop and clock are control/probe.py's.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from functools import partial
from typing import Any

from gateway.control.engines import LoadMetricNames, metric_names, scrape_report
from gateway.control.probe import Ask, Plan, Probe, poll_timeout
from gateway.pool.live import Live
from gateway.pool.replicas import load_report

MAX_REPORT_BYTES = 4 * 1024 * 1024  # an engine's whole /metrics page, histograms included


@dataclass(frozen=True)
class LoadReading:
    report: dict[str, float]  # as pool.load_report gives it, `inflight` included
    by_model: dict[str, int] | None = None  # a scrape's requests per model label


def read_load(status: int, body: bytes, names: LoadMetricNames | None) -> LoadReading | None:
    """A replica's load from its answer: our JSON /load (`names` None) or an engine's /metrics;
    None when it holds no report (a 404, no `inflight`, not this engine's metrics). Malformed
    JSON or exposition raises ValueError (or RecursionError)."""
    if status != 200:
        return None  # a replica without the endpoint
    if names is not None:
        scrape = scrape_report(body.decode("utf-8", errors="replace"), names)
        return None if scrape is None else LoadReading(scrape.report, scrape.by_model)
    load: Any = json.loads(body)
    report = load_report(load) if isinstance(load, dict) else {}
    return LoadReading(report) if "inflight" in report else None


class LoadProbe(Probe[LoadReading | None]):
    name = "load feedback"
    consequence = "its last report ages out"
    log = logging.getLogger(__name__)

    def __init__(self, live: Live) -> None:
        self._live = live

    def plan(self) -> Plan[LoadReading | None] | None:
        feedback = self._live.runtime.config.load_feedback
        interval = feedback.poll_interval_s
        if interval == 0:
            return None
        asks = [Ask(replica, feedback.path) for replica in self._live.pool.active()]
        parse = partial(read_load, names=metric_names(feedback))
        return Plan(asks, parse, interval, poll_timeout(interval), MAX_REPORT_BYTES)

    def apply(self, ask: Ask, value: LoadReading | None) -> None:
        # The replica counted our requests in flight as it answered: ours now.
        if value is None:
            return
        replica = ask.replica
        if value.by_model is not None:
            replica.model_load = value.by_model
        self._live.pool.report(replica, value.report, ours=replica.busy)

"""Load feedback by polling: every `load_feedback.poll_interval_s`, each replica's load.

With `source: infergate` that is GET /load (JSON, our replica); replicas also report their load
on every response (X-Replica-Load, read by the proxy), but a replica this gateway has not sent
to lately would go unheard, so the poll keeps every report fresh and `least_loaded` sees
requests that other gateway instances sent. With `vllm`, `sglang`, `tgi` or `prometheus` it is
a scrape of GET /metrics read as gateway/control/engines.py says. A failed poll costs only that
replica's report (the last one ages out after `max_age_s`) and one log line when its polls
start failing: health checks and outlier detection deal with broken replicas. Bodies are read
with a cap, and values by pool.load_report's rule (whole counts, a share from 0 to 1).
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import aiohttp

from gateway.config import LoadFeedback
from gateway.control.engines import LoadMetricNames, metric_names, scrape_report
from gateway.control.fetch import POLL_FAILURES, PollFailures, Session, read_capped
from gateway.pool.live import Live
from gateway.pool.replicas import load_report
from gateway.routing.replica import Replica

log = logging.getLogger(__name__)
MAX_REPORT_BYTES = 4 * 1024 * 1024  # an engine's whole /metrics page, histograms included


class LoadPoller:
    def __init__(self, live: Live, session: Session) -> None:
        self._live = live
        self._session = session
        self._failures = PollFailures(log, "load feedback", "its last report ages out")

    async def run(self) -> None:
        while True:
            feedback = self._live.runtime.config.load_feedback
            if feedback.poll_interval_s > 0:
                await self.poll_once(feedback)
            # Polling may be switched on by a reload; look again at the reload cadence.
            await asyncio.sleep(
                feedback.poll_interval_s or self._live.runtime.config.reload.poll_interval_s
            )

    async def poll_once(self, feedback: LoadFeedback) -> None:
        replicas = self._live.pool.active()
        self._failures.keep({r.url for r in replicas})
        limit = aiohttp.ClientTimeout(total=max(0.05, min(1.0, feedback.poll_interval_s)))
        names = metric_names(feedback)
        await asyncio.gather(*(self._poll(r, feedback.path, names, limit) for r in replicas))

    async def _poll(
        self,
        replica: Replica,
        path: str,
        names: LoadMetricNames | None,
        limit: aiohttp.ClientTimeout,
    ) -> None:
        try:
            body = await self._read(replica.url + path, limit)
            # The replica counted our requests in flight as it answered: ours now.
            ours = replica.busy
            if body is not None:
                self._take(replica, body, names, ours)
        except POLL_FAILURES as error:
            self._failures.failed(replica.url, error)
        else:
            self._failures.ok(replica.url)

    async def _read(self, url: str, limit: aiohttp.ClientTimeout) -> bytes | None:
        """The body of a 200 (a replica without the endpoint answers 404: no report)."""
        async with self._session().get(url, timeout=limit) as response:
            if response.status != 200:
                return None
            return await read_capped(response, MAX_REPORT_BYTES)

    def _take(
        self, replica: Replica, body: bytes, names: LoadMetricNames | None, ours: int
    ) -> None:
        if names is not None:
            scrape = scrape_report(body.decode("utf-8", errors="replace"), names)
            if scrape is not None:
                replica.model_load = scrape.by_model
                self._live.pool.report(replica, scrape.report, ours=ours)
            return
        load: Any = json.loads(body)
        report = load_report(load) if isinstance(load, dict) else {}
        if "inflight" in report:
            self._live.pool.report(replica, report, ours=ours)

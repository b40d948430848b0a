"""Load feedback by polling: every `load_feedback.poll_interval_s`, each replica's load.

With `source: infergate` that is GET /load (JSON, our replica); replicas also report their load
on every response (X-Replica-Load, read by the proxy), but a replica this gateway has not sent
to lately would go unheard, so the poll keeps every report fresh and `least_loaded` sees
requests that other gateway instances sent. With `vllm`, `sglang`, `tgi` or `prometheus` it is
a scrape of GET /metrics read as gateway/engines.py says. A failed poll is ignored (the last
report ages out after `max_age_s`): health checks and outlier detection deal with broken
replicas. Bodies are read with a cap.
"""

from __future__ import annotations

import asyncio
import contextlib
import json

import aiohttp

from gateway.config import LoadFeedback
from gateway.engines import LoadMetricNames, metric_names, scrape_report
from gateway.pool import Replica
from gateway.runtime import GatewayState
from gateway.upstream import BodyOverLimit, read_capped

MAX_REPORT_BYTES = 4 * 1024 * 1024  # an engine's whole /metrics page, histograms included


class LoadPoller:
    def __init__(self, state: GatewayState) -> None:
        self._state = state

    async def run(self) -> None:
        while True:
            feedback = self._state.runtime.config.load_feedback
            if feedback.poll_interval_s > 0:
                await self.poll_once(feedback)
            # Polling may be switched on by a reload; look again at the reload cadence.
            await asyncio.sleep(
                feedback.poll_interval_s or self._state.runtime.config.reload.poll_interval_s
            )

    async def poll_once(self, feedback: LoadFeedback) -> None:
        replicas = self._state.pool.active()
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
        session = self._state.client()
        failures = (aiohttp.ClientError, TimeoutError, ValueError, RecursionError, BodyOverLimit)
        with contextlib.suppress(*failures):
            async with session.get(replica.url + path, timeout=limit) as response:
                if response.status != 200:
                    return
                body = await read_capped(response, MAX_REPORT_BYTES)
            # The replica counted our requests in flight as it answered: ours now.
            ours = replica.busy
            if names is not None:
                scrape = scrape_report(body.decode("utf-8", errors="replace"), names)
                if scrape is not None:
                    replica.model_load = scrape.by_model
                    self._state.pool.report(replica, scrape.report, ours=ours)
                return
            load = json.loads(body)
            if not isinstance(load, dict):
                return
            report = {
                k: v
                for k, v in load.items()
                if isinstance(v, int | float) and not isinstance(v, bool) and 0 <= v < 2**53
            }
            if "inflight" in report:
                self._state.pool.report(replica, report, ours=ours)

"""Load feedback by polling: every `load_feedback.poll_interval_s`, GET /load on each replica.

Replicas also report their load on every response (X-Replica-Load, read by the proxy), but a
replica this gateway has not sent to lately would go unheard; the poll keeps every report
fresh, so `least_loaded` sees requests that other gateway instances sent. A failed poll is
ignored: health checks and outlier detection deal with broken replicas.
"""

from __future__ import annotations

import asyncio
import contextlib
import json

import aiohttp

from gateway.config import LoadFeedback
from gateway.pool import Replica
from gateway.runtime import GatewayState


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
        await asyncio.gather(*(self._poll(r, feedback.path, limit) for r in replicas))

    async def _poll(self, replica: Replica, path: str, limit: aiohttp.ClientTimeout) -> None:
        session = self._state.client()
        with contextlib.suppress(aiohttp.ClientError, TimeoutError, ValueError):
            async with session.get(replica.url + path, timeout=limit) as response:
                if response.status != 200:
                    return
                load = json.loads(await response.read())
                if not isinstance(load, dict):
                    return
                report = {
                    k: v
                    for k, v in load.items()
                    if isinstance(v, int | float) and not isinstance(v, bool) and 0 <= v < 2**53
                }
                if "inflight" in report:
                    # The replica counted our requests in flight as it answered: ours now.
                    self._state.pool.report(replica, report, ours=replica.outstanding)

"""Active health checks: one task probes every configured replica's health path on an interval.

A replica turns unhealthy after `unhealthy_threshold` failed probes in a row and healthy again
after `healthy_threshold` good ones; the pool holds the verdict, the checker only its streaks,
kept for the replicas of the last round only (DNS discovery may replace every address).
Replicas start healthy and are probed at once, so a fresh gateway serves without waiting.
A probe is judged by its status alone: the body is never read, so a replica
that answers with an endless one costs a read buffer, and the connection is closed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping

import aiohttp

from gateway.config import HealthCheck
from gateway.control.fetch import Session
from gateway.pool.live import Live
from gateway.routing.replica import Replica

log = logging.getLogger(__name__)


async def probe(session: aiohttp.ClientSession, url: str, check: HealthCheck) -> bool:
    try:
        timeout = aiohttp.ClientTimeout(total=check.timeout_s)
        # The body is not read: leaving the block releases the connection, which aiohttp
        # keeps only when the whole body had come already (else it closes it, never drains).
        async with session.get(url + check.path, timeout=timeout) as response:
            return response.status == 200
    except (aiohttp.ClientError, TimeoutError):
        return False


class HealthChecker:
    def __init__(self, live: Live, session: Session) -> None:
        self._live = live
        self._session = session
        self._streaks: dict[str, int] = {}  # >0: good probes in a row, <0: failures in a row

    @property
    def streaks(self) -> Mapping[str, int]:
        return self._streaks

    async def run(self) -> None:
        while True:
            check = self._live.runtime.config.health_check
            if check is None:
                if self._streaks:
                    self._forget_all()
                # Checks may be switched on by a reload; look again at the reload cadence.
                await asyncio.sleep(self._live.runtime.config.reload.poll_interval_s)
                continue
            await self.check_once(check)
            await asyncio.sleep(check.interval_s)

    async def check_once(self, check: HealthCheck) -> None:
        replicas = self._live.pool.all()
        session = self._session()
        results = await asyncio.gather(*(probe(session, r.url, check) for r in replicas))
        probed = {replica.url for replica in replicas}
        for url in [url for url in self._streaks if url not in probed]:
            del self._streaks[url]  # a replica that left the pool
        for replica, ok in zip(replicas, results, strict=True):
            self._record(replica, ok, check)

    def _record(self, replica: Replica, ok: bool, check: HealthCheck) -> None:
        streak = self._streaks.get(replica.url, 0)
        streak = max(streak, 0) + 1 if ok else min(streak, 0) - 1
        self._streaks[replica.url] = streak
        if not replica.healthy and streak >= check.healthy_threshold:
            log.info("replica %s is healthy again", replica.url)
            self._live.pool.set_healthy(replica, True)
        elif replica.healthy and -streak >= check.unhealthy_threshold:
            log.warning("replica %s failed %d health checks; ejected", replica.url, -streak)
            self._live.pool.set_healthy(replica, False)

    def _forget_all(self) -> None:
        # Checks switched off by a reload: nothing would bring an ejected replica back.
        self._streaks.clear()
        for replica in self._live.pool.all():
            self._live.pool.set_healthy(replica, True)

"""Active health checks: one task probes every configured replica's health path on an interval.

A replica turns unhealthy after `unhealthy_threshold` failed probes in a row and healthy again
after `healthy_threshold` good ones; the pool holds the verdict, the checker only its streaks,
kept for the replicas of the last round only (DNS discovery may replace every address).
Replicas start healthy and are probed at once, so a fresh gateway serves without waiting.
A probe is judged by its status alone: the body is never read, so a replica
that answers with an endless one costs a read buffer, and the connection is closed.

The other control pollers (load feedback, served models, cache blocks) read what replicas
answer through `get_json` and `PollFailures` here (discovery logs through it too): bounded
reads, every way a hostile answer can fail caught per replica, one log line per replica per
bad streak, never a traceback.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Collection, Mapping
from typing import Any

import aiohttp

from gateway.app.state import GatewayState
from gateway.config import HealthCheck
from gateway.datapath.upstream import BodyOverLimit, read_capped
from gateway.errors import clipped
from gateway.routing.replica import Replica

log = logging.getLogger(__name__)

# What reading a replica's answer can raise: the connection, the clock, the size cap, and the
# decoder (ValueError covers malformed JSON, UnicodeDecodeError and over-long integers;
# RecursionError deep nesting). A poller catches these per replica and nothing else, so a bug
# of ours still shows.
POLL_FAILURES = (aiohttp.ClientError, TimeoutError, BodyOverLimit, ValueError, RecursionError)


async def probe(session: aiohttp.ClientSession, url: str, check: HealthCheck) -> bool:
    try:
        timeout = aiohttp.ClientTimeout(total=check.timeout_s)
        # The body is not read: leaving the block releases the connection, which aiohttp
        # keeps only when the whole body had come already (else it closes it, never drains).
        async with session.get(url + check.path, timeout=timeout) as response:
            return response.status == 200
    except (aiohttp.ClientError, TimeoutError):
        return False


async def get_json(
    session: aiohttp.ClientSession,
    url: str,
    *,
    max_bytes: int,
    limit: aiohttp.ClientTimeout,
    params: Mapping[str, str] | None = None,
) -> tuple[int, Any]:
    """A replica's status and, for a 200, its JSON body (read up to `max_bytes`); raises one of
    POLL_FAILURES."""
    async with session.get(url, params=params, timeout=limit) as response:
        if response.status != 200:
            return response.status, None  # an error page is not read (see probe)
        return 200, json.loads(await read_capped(response, max_bytes))


class PollFailures:
    """A poller's failed replicas: each named once when its polls start failing (a poller runs
    every second or faster, and a line a round would bury the log), without a traceback (the
    fault is in the replica's answer, not here), and again only after a good poll."""

    def __init__(self, logger: logging.Logger, poller: str, consequence: str) -> None:
        self._log = logger
        self._poller = poller
        self._consequence = consequence
        self._failing: set[str] = set()

    def failed(self, url: str, error: BaseException) -> None:
        if url not in self._failing:
            self._failing.add(url)
            reason = clipped(str(error)) or "no detail"
            self._log.warning(
                "%s: %s failed (%s: %s); %s",
                self._poller, url, type(error).__name__, reason, self._consequence,
            )  # fmt: skip

    def ok(self, url: str) -> None:
        self._failing.discard(url)

    def keep(self, urls: Collection[str]) -> None:
        """Forget replicas that left the pool (discovery may replace every address)."""
        self._failing.intersection_update(urls)


class HealthChecker:
    def __init__(self, state: GatewayState) -> None:
        self._state = state
        self._streaks: dict[str, int] = {}  # >0: good probes in a row, <0: failures in a row

    @property
    def streaks(self) -> Mapping[str, int]:
        return self._streaks

    async def run(self) -> None:
        while True:
            check = self._state.runtime.config.health_check
            if check is None:
                if self._streaks:
                    self._forget_all()
                # Checks may be switched on by a reload; look again at the reload cadence.
                await asyncio.sleep(self._state.runtime.config.reload.poll_interval_s)
                continue
            await self.check_once(check)
            await asyncio.sleep(check.interval_s)

    async def check_once(self, check: HealthCheck) -> None:
        replicas = self._state.pool.all()
        session = self._state.client()
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
            self._state.pool.set_healthy(replica, True)
        elif replica.healthy and -streak >= check.unhealthy_threshold:
            log.warning("replica %s failed %d health checks; ejected", replica.url, -streak)
            self._state.pool.set_healthy(replica, False)

    def _forget_all(self) -> None:
        # Checks switched off by a reload: nothing would bring an ejected replica back.
        self._streaks.clear()
        for replica in self._state.pool.all():
            self._state.pool.set_healthy(replica, True)

"""Active health checks: every `health_check.interval_s`, each replica's health path, judged by
its status alone (the loop is control/probe.py's).

A replica turns unhealthy after `unhealthy_threshold` failed probes in a row and healthy again
after `healthy_threshold` good ones; the pool holds the verdict, the checker only its streaks,
kept for the replicas in the pool only (DNS discovery may replace every address). Replicas
start healthy and are probed at once, so a fresh gateway serves without waiting. The body is
never read, so a replica that answers with an endless one costs a read buffer, and the
connection is closed. The checker logs its verdicts, not each failed probe.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping

from gateway.control.probe import Ask, Plan, Probe
from gateway.pool.live import Live
from gateway.routing.replica import Replica


def healthy_answer(status: int, body: bytes) -> bool:
    return status == 200


class HealthChecker(Probe[bool]):
    name = "health checks"
    consequence = None  # the verdicts are logged instead
    log = logging.getLogger(__name__)

    def __init__(self, live: Live) -> None:
        self._live = live
        self._streaks: dict[str, int] = {}  # >0: good probes in a row, <0: failures in a row

    @property
    def streaks(self) -> Mapping[str, int]:
        return self._streaks

    def plan(self) -> Plan[bool] | None:
        check = self._live.runtime.config.health_check
        if check is None:
            return None
        asks = [Ask(replica, check.path) for replica in self._live.pool.all()]
        return Plan(asks, healthy_answer, check.interval_s, check.timeout_s, max_bytes=0)

    def apply(self, ask: Ask, value: bool) -> None:
        self._record(ask.replica, value)

    def failed(self, ask: Ask, error: Exception) -> None:
        self._record(ask.replica, False)

    def keep(self, present: Collection[Replica]) -> None:
        urls = {replica.url for replica in present}
        for url in [url for url in self._streaks if url not in urls]:
            del self._streaks[url]

    def off(self) -> None:
        # Checks switched off by a reload: nothing would bring an ejected replica back.
        if self._streaks:
            self._streaks.clear()
            for replica in self._live.pool.all():
                self._live.pool.set_healthy(replica, True)

    def _record(self, replica: Replica, ok: bool) -> None:
        check = self._live.runtime.config.health_check
        if check is None:  # switched off meanwhile
            return
        streak = self._streaks.get(replica.url, 0)
        streak = max(streak, 0) + 1 if ok else min(streak, 0) - 1
        self._streaks[replica.url] = streak
        if not replica.healthy and streak >= check.healthy_threshold:
            self.log.info("replica %s is healthy again", replica.url)
            self._live.pool.set_healthy(replica, True)
        elif replica.healthy and -streak >= check.unhealthy_threshold:
            self.log.warning("replica %s failed %d health checks; ejected", replica.url, -streak)
            self._live.pool.set_healthy(replica, False)

"""Passive outlier detection: a replica that fails `consecutive_failures` requests in a row
(connect error, reset, timeout or 5xx) is ejected for base_ejection_s x (times ejected), capped
at max_ejection_s, unless that would eject more than max_ejected_percent of the replicas (one
replica may always be ejected). It returns when the time is up and, where active health checks
run, only while they pass. The pool holds the state; this module holds the rule."""

from __future__ import annotations

import logging
import math

from gateway.config import OutlierDetection
from gateway.pool.replicas import ReplicaPool
from gateway.routing.replica import Replica

log = logging.getLogger(__name__)


def ejection_s(settings: OutlierDetection, ejections_before: int) -> float:
    return min(settings.base_ejection_s * (ejections_before + 1), settings.max_ejection_s)


def may_eject(settings: OutlierDetection, pool: ReplicaPool) -> bool:
    allowed = max(1, math.floor(len(pool.active()) * settings.max_ejected_percent / 100))
    return pool.ejected_count() < allowed


def observe(pool: ReplicaPool, replica: Replica, settings: OutlierDetection | None) -> float | None:
    """After a request's outcome is in the pool: eject if the rule says so; the ejection time."""
    if settings is None or replica.draining or pool.is_ejected(replica):
        return None
    if replica.consecutive_failures < settings.consecutive_failures:
        return None
    if not may_eject(settings, pool):
        log.warning("replica %s keeps failing, but max_ejected_percent is reached", replica.url)
        return None
    duration = ejection_s(settings, replica.ejections)
    pool.eject(replica, duration)
    log.warning(
        "replica %s ejected for %.0f s after %d failures in a row",
        replica.url,
        duration,
        replica.consecutive_failures,
    )
    return duration

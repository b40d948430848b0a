"""Passive outlier detection with a fake clock: ejection, growing back-off, cap, return."""

from __future__ import annotations

from gateway.config import OutlierDetection
from gateway.pool import outlier
from gateway.pool.replicas import ReplicaPool
from gateway.routing.replica import Replica

SETTINGS = OutlierDetection(
    consecutive_failures=3, base_ejection_s=5, max_ejection_s=12, max_ejected_percent=50
)


def _fail(pool: ReplicaPool, replica: Replica, times: int) -> float | None:
    ejected = None
    for _ in range(times):
        pool.acquire(replica)
        pool.release(replica, outcome="failed")
        ejected = outlier.observe(pool, replica, SETTINGS) or ejected
    return ejected


def test_consecutive_failures_eject_and_the_back_off_grows_to_the_cap() -> None:
    now = [0.0]
    pool = ReplicaPool(["http://a:1", "http://b:1", "http://c:1", "http://d:1"], lambda: now[0])
    a = pool.active()[0]
    assert _fail(pool, a, 2) is None and a in pool.available()
    assert _fail(pool, a, 1) == 5.0
    assert a not in pool.available() and a.ejected_until == 5.0
    now[0] = 5.0
    assert a in pool.available()  # back once the time is up
    assert _fail(pool, a, 3) == 10.0
    now[0] = 15.0
    assert _fail(pool, a, 3) == 12.0  # capped at max_ejection_s


def test_a_success_resets_the_streak() -> None:
    pool = ReplicaPool(["http://a:1", "http://b:1"])
    a = pool.active()[0]
    _fail(pool, a, 2)
    pool.acquire(a)
    pool.release(a, outcome="served")
    assert _fail(pool, a, 2) is None and a in pool.available()


def test_no_more_than_the_allowed_share_is_ejected_but_always_one() -> None:
    pool = ReplicaPool(["http://a:1", "http://b:1", "http://c:1", "http://d:1"])
    a, b, c, _ = pool.active()
    assert _fail(pool, a, 3) and _fail(pool, b, 3)
    assert _fail(pool, c, 5) is None  # 50% of 4 are out already
    assert len(pool.available()) == 2
    single = ReplicaPool(["http://only:1"])
    assert _fail(single, single.active()[0], 3) == 5.0


def test_an_unhealthy_ejected_replica_stays_out_after_its_time() -> None:
    now = [0.0]
    pool = ReplicaPool(["http://a:1", "http://b:1"], lambda: now[0])
    a = pool.active()[0]
    _fail(pool, a, 3)
    pool.set_healthy(a, False)
    now[0] = 100.0
    assert a not in pool.available()
    pool.set_healthy(a, True)
    assert a in pool.available()

"""Counts shared by a gateway's workers: exact totals with every worker writing at once, columns
found by URL in every worker, reused when nobody holds them, and a dead worker's row cleared."""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.pool.replicas import ReplicaPool
from gateway.pool.shared import ColumnsFull, SharedCounts


@pytest.fixture
def segment(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    name, lock = f"ig-test-{uuid.uuid4().hex[:12]}", tmp_path / "counts.lock"
    owner = SharedCounts(name, 3, 0, columns=64, lock_path=lock, create=True)
    try:
        yield name, lock
    finally:
        owner.close()
        owner.unlink()


WORKER = """
import sys
from pathlib import Path
from gateway.pool.replicas import ReplicaPool
from gateway.pool.shared import SharedCounts
name, lock, row, rounds = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
counts = SharedCounts(name, 3, row, columns=64, lock_path=lock)
pool = ReplicaPool(["http://a", "http://b"], shared=counts)
a, b = pool.active()
for i in range(rounds):
    pool.acquire(a)
    pool.acquire(b)
    if i % 2:
        pool.release(a, outcome="served")
counts.close()
"""


def test_every_worker_writes_its_row_and_the_column_sums_are_exact(
    segment: tuple[str, Path],
) -> None:
    name, lock = segment
    workers = [
        subprocess.Popen([sys.executable, "-c", WORKER, name, str(lock), str(row), "2000"])
        for row in (1, 2)
    ]
    assert [w.wait(60) for w in workers] == [0, 0]
    reader = SharedCounts(name, 3, 0, columns=64, lock_path=lock)
    pool = ReplicaPool(["http://b", "http://a"], shared=reader)  # another order: same columns
    b, a = pool.active()
    assert (a.busy, b.busy) == (2 * 1000, 2 * 2000) and (a.outstanding, b.outstanding) == (0, 0)
    pool.acquire(a)
    assert a.busy == 2001
    reader.clear_row(1)  # worker 1 died: its requests no longer count
    assert (a.busy, b.busy) == (1001, 2000)
    reader.close()


def test_columns_are_reused_only_when_no_worker_holds_them(segment: tuple[str, Path]) -> None:
    name, lock = segment
    one = SharedCounts(name, 3, 1, columns=64, lock_path=lock)
    two = SharedCounts(name, 3, 2, columns=64, lock_path=lock)
    columns = {one.hold(f"http://r{i}") for i in range(64)}
    assert columns == set(range(64))
    with pytest.raises(ColumnsFull):
        one.hold("http://one-more")
    r5, r6, r7 = (one.hold(f"http://r{i}") for i in (5, 6, 7))
    assert two.hold("http://r5") == r5  # the same replica, the same column
    one.set(r7, 3)
    one.drop("http://r5")  # still held by worker two
    one.drop("http://r6")  # held by nobody now: reusable
    assert two.hold("http://new") == r6
    assert two.total(r7) == 3
    one.close()
    two.close()


def test_a_pool_drops_the_column_of_a_replica_once_it_has_drained(
    segment: tuple[str, Path],
) -> None:
    name, lock = segment
    counts = SharedCounts(name, 3, 1, columns=64, lock_path=lock)
    pool = ReplicaPool(["http://a"], shared=counts)
    (a,) = pool.active()
    pool.acquire(a)
    pool.update(["http://b"])  # a drains: still held, still counted
    assert a.draining and counts.total(a.column) == 1
    pool.release(a, outcome="served")
    assert counts.total(a.column) == 0
    other = SharedCounts(name, 3, 2, columns=64, lock_path=lock)
    for i in range(63):  # every free column, then a's (nobody holds it now)
        other.hold(f"http://x{i}")
    counts.close()
    other.close()


def test_workers_in_the_config() -> None:
    from gateway.app.workers import worker_count
    from gateway.config import ConfigError, parse_config

    base = {"replicas": [{"url": "http://a"}]}
    assert parse_config(base).workers == 1
    assert worker_count(parse_config({**base, "workers": "auto"}).workers) >= 1
    assert worker_count(parse_config({**base, "workers": 4}).workers) == 4
    for bad in (0, 65, "many"):
        with pytest.raises(ConfigError, match="workers"):
            parse_config({**base, "workers": bad})
    assert parse_config({**base, "workers": 2, "jobs": {"store": "j.db"}}).workers == 2


def test_the_gateway_wide_count_sums_every_worker(segment: tuple[str, Path]) -> None:
    name, lock = segment
    one = ReplicaPool(["http://a"], shared=SharedCounts(name, 3, 1, columns=64, lock_path=lock))
    two = ReplicaPool(["http://b"], shared=SharedCounts(name, 3, 2, columns=64, lock_path=lock))
    for _ in range(3):
        one.acquire(one.active()[0])
    two.acquire(two.active()[0])
    assert one.outstanding_everywhere() == two.outstanding_everywhere() == 4
    assert one.outstanding == 3
    two.release(two.active()[0], outcome="served")
    assert one.outstanding_everywhere() == 3
    assert one.shared is not None
    one.shared.clear_row(1)
    assert two.outstanding_everywhere() == 0
    for pool in (one, two):
        assert pool.shared is not None
        pool.shared.close()


def test_stats_sum_every_workers_publishes_and_outlive_a_dead_worker(
    segment: tuple[str, Path],
) -> None:
    name, lock = segment
    one, two = (SharedCounts(name, 3, row, columns=64, lock_path=lock) for row in (1, 2))
    try:
        column = one.hold("http://a")
        assert two.hold("http://a") == column
        one.publish(column, (5, 1, 0))
        two.publish(column, (3, 0, 1))
        one.publish(column, (7, 2, 0))  # totals so far, not increments
        assert two.stats(column) == (10, 2, 1)
        two.clear_row(1)  # worker 1 died: its requests still count ...
        one.close()
        one = SharedCounts(name, 3, 1, columns=64, lock_path=lock)  # ... and its successor's add
        assert one.hold("http://a") == column
        one.publish(column, (4, 0, 0))
        assert two.stats(column) == (14, 2, 1)
    finally:
        one.close()
        two.close()


def test_a_column_taken_over_by_another_replica_starts_its_stats_from_zero(tmp_path: Path) -> None:
    name = f"ig-test-{uuid.uuid4().hex[:12]}"
    counts = SharedCounts(name, 1, 0, columns=1, lock_path=tmp_path / "lock", create=True)
    try:
        column = counts.hold("http://a")
        counts.publish(column, (9, 9, 9))
        counts.drop("http://a")
        assert counts.hold("http://b") == column  # the only column, nobody holds it
        assert counts.stats(column) == (0, 0, 0)
        counts.publish(column, (1, 0, 0))
        assert counts.stats(column) == (1, 0, 0)
    finally:
        counts.close()
        counts.unlink()

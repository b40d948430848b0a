"""Key limits shared by a gateway's workers: workers taking from one key at once never get more
than its limit in total, requests in flight are summed over every worker's row, a dead worker's
are cleared, and a key's slot is the same in every worker."""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.config import KeyLimits
from gateway.flow.buckets_shared import SharedBuckets, SlotsFull
from gateway.flow.limits import Limiter, RateLimited

NOW = 1000.0  # every process's clock, stopped: no refill while they take


@pytest.fixture
def segment(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    name, lock = f"ig-test-{uuid.uuid4().hex[:12]}", tmp_path / "buckets.lock"
    owner = SharedBuckets(name, 3, 0, slots=64, lock_path=lock, create=True)
    try:
        yield name, lock
    finally:
        owner.close()
        owner.unlink()


# Takes from key "hot" as fast as it can once told to go, then holds `held` requests of key
# "held" and dies without settling them.
WORKER = """
import os, sys
from pathlib import Path
from gateway.config import KeyLimits
from gateway.flow.buckets_shared import SharedBuckets
from gateway.flow.limits import Limiter, RateLimited
name, lock, row, attempts, held = sys.argv[1], Path(sys.argv[2]), *map(int, sys.argv[3:])
limiter = Limiter(SharedBuckets(name, 3, row, slots=64, lock_path=lock), lambda: 1000.0)
hot = KeyLimits(requests_per_minute=500, tokens_per_minute=10**6, max_parallel=2)
print("ready", flush=True)
sys.stdin.readline()
taken = 0
for _ in range(attempts):
    try:
        reservation = limiter.reserve("hot", hot, 7)
    except RateLimited:
        continue
    taken += 1
    reservation.settle(5)
for _ in range(held):
    limiter.reserve("held", KeyLimits(max_parallel=6), 1)
print(taken, flush=True)
os._exit(0)
"""


def test_workers_taking_at_once_get_the_limit_exactly_and_their_in_flight_is_summed(
    segment: tuple[str, Path],
) -> None:
    name, lock = segment
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, name, str(lock), str(row), "1500", str(held)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for row, held in ((1, 3), (2, 2))
    ]
    for worker in workers:
        assert worker.stdout is not None and worker.stdout.readline() == "ready\n"
    for worker in workers:  # both at once
        assert worker.stdin is not None
        worker.stdin.write("go\n")
        worker.stdin.flush()
    taken = [int(worker.communicate(timeout=60)[0]) for worker in workers]
    assert [worker.returncode for worker in workers] == [0, 0]
    assert sum(taken) == 500 and min(taken) > 0

    table = SharedBuckets(name, 3, 0, slots=64, lock_path=lock)
    limiter = Limiter(table, lambda: NOW)
    hot = KeyLimits(requests_per_minute=500, tokens_per_minute=10**6)
    state = table.update("hot", lambda state: state)
    assert (state.requests.level, state.tokens.level, state.in_flight) == (0, 10**6 - 2500, 0)
    with pytest.raises(RateLimited):
        limiter.reserve("hot", hot, 1)

    held = KeyLimits(max_parallel=6)
    assert table.update("held", lambda state: state.in_flight) == 5  # rows 1 and 2
    mine = limiter.reserve("held", held, 1)
    with pytest.raises(RateLimited) as caught:
        limiter.reserve("held", held, 1)
    assert caught.value.code == "parallel_requests"
    table.clear_row(1)  # worker 1 died: its 3 no longer count
    assert table.update("held", lambda state: state.in_flight) == 3
    for _ in range(3):
        limiter.reserve("held", held, 1)
    mine.settle(None)
    table.clear_row(2)
    assert table.update("held", lambda state: state.in_flight) == 3  # row 0's own
    table.close()


def test_time_in_the_segment_is_one_clock_for_every_worker(segment: tuple[str, Path]) -> None:
    name, lock = segment
    one = SharedBuckets(name, 3, 1, slots=64, lock_path=lock)
    two = SharedBuckets(name, 3, 2, slots=64, lock_path=lock)
    limits = KeyLimits(requests_per_minute=600)  # 10 a second
    for _ in range(600):
        Limiter(one, lambda: NOW).reserve("k", limits, 0).settle(None)
    later = Limiter(two, lambda: NOW + 1.5)  # the other worker, 1.5 s later: 15 back
    for _ in range(15):
        later.reserve("k", limits, 0).settle(None)
    with pytest.raises(RateLimited):
        later.reserve("k", limits, 0)
    one.close()
    two.close()


def test_a_key_has_one_slot_in_every_worker_until_they_are_full(
    segment: tuple[str, Path],
) -> None:
    name, lock = segment
    one = SharedBuckets(name, 3, 1, slots=64, lock_path=lock)
    two = SharedBuckets(name, 3, 2, slots=64, lock_path=lock)
    limits = KeyLimits(tokens_per_minute=100)
    for i in range(64):
        Limiter(one, lambda: NOW).reserve(f"key-{i}", limits, i)
    for i in reversed(range(64)):  # another order: the same slots, the same levels
        assert two.update(f"key-{i}", lambda state: state.tokens.level) == 100 - i
    with pytest.raises(SlotsFull):
        one.update("one-more", lambda state: state)
    one.close()
    two.close()


def test_a_refusal_writes_nothing(segment: tuple[str, Path]) -> None:
    name, lock = segment
    table = SharedBuckets(name, 3, 1, slots=64, lock_path=lock)
    limiter = Limiter(table, lambda: NOW)
    limits = KeyLimits(requests_per_minute=5, tokens_per_minute=100)
    limiter.reserve("k", limits, 60)
    with pytest.raises(RateLimited):
        limiter.reserve("k", limits, 50)  # requests there, tokens not: neither taken
    state = table.update("k", lambda state: state)
    assert (state.requests.level, state.tokens.level, state.in_flight) == (4, 40, 1)
    table.close()

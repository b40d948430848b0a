"""The limits store loop, tick by tick on a fake clock, against the global buckets kept in
memory by the rules the SQL keeps them by: low allowances topped up to a slice in one round
trip, two gateways sharing one bucket, an outage under `deny` (marks, the refusal's words) and
`allow` (the clock refills, cut to a slice on recovery), logged once a streak and counted, and
the allowance handed back at shutdown."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import pytest

from gateway.config import KeyLimits, parse_config
from gateway.control.limits_store import BUSY_TICK_S, DOWN_TICK_S, IDLE_TICK_S, Ask, LimitsLoop
from gateway.flow.limits import STORE_UP, Kind, Leased, Limiter, LocalTable, RateLimited
from gateway.pool.live import Live, build_runtime
from gateway.pool.replicas import ReplicaPool

RPM = KeyLimits(requests_per_minute=60)  # a slice of 5 %: 3, the floor 1.5
TPM = KeyLimits(tokens_per_minute=1000)  # a slice: 50


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class MemoryStore:
    """Global buckets in memory: full on first use, refilled at capacity a minute, a lease
    takes min(wanted, level). `down`: every round trip fails as a refused connection does."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock, self.down, self.trips, self.closed = clock, False, 0, False
        self.rows: dict[tuple[str, Kind], tuple[float, float]] = {}  # level, at

    async def lease(self, asks: Sequence[Ask]) -> dict[tuple[str, Kind], float]:
        granted = {}
        for ask in self._trip(asks):
            level = self.level(ask)
            granted[ask.key, ask.kind] = taken = min(ask.amount, max(0.0, level))
            self.rows[ask.key, ask.kind] = (level - taken, self.clock.now)
        return granted

    async def give_back(self, asks: Sequence[Ask]) -> None:
        for ask in self._trip(asks):
            level = min(ask.capacity, self.level(ask) + ask.amount)
            self.rows[ask.key, ask.kind] = (level, self.clock.now)

    async def close(self) -> None:
        self.closed = True

    def level(self, ask: Ask) -> float:
        level, at = self.rows.get((ask.key, ask.kind), (ask.capacity, self.clock.now))
        return min(ask.capacity, level + (self.clock.now - at) * ask.capacity / 60)

    def _trip(self, asks: Sequence[Ask]) -> Sequence[Ask]:
        self.trips += 1
        if self.down:
            raise ConnectionRefusedError("connection refused")
        return asks


def gateway(
    store: MemoryStore, clock: FakeClock, unavailable: str = "deny"
) -> tuple[LimitsLoop, Live, list[int]]:
    """A gateway's live state (one key with each limit) and its loop; the errors counted."""
    keys: list[dict[str, Any]] = [
        {"name": "r", "key": "sk-r-0123456789", "limits": {"requests_per_minute": 60}},
        {"name": "t", "key": "sk-t-0123456789", "limits": {"tokens_per_minute": 1000}},
        {"name": "p", "key": "sk-p-0123456789", "limits": {"max_parallel": 2}},
    ]
    config = parse_config(
        {
            "replicas": [{"url": "http://127.0.0.1:9"}],
            "auth": {"api_keys": keys},
            "flow_control": {"store": "postgresql://u@127.0.0.1:9/db",
                             "store_unavailable": unavailable},
        }
    )  # fmt: skip
    live = Live.start(build_runtime(config), ReplicaPool(config.replica_urls))
    live.limiter = Limiter(LocalTable(), clock, leased=Leased(5))
    errors: list[int] = []
    loop = LimitsLoop(live, store, on_error=lambda: errors.append(1), clock=clock)
    return loop, live, errors


def served(live: Live, key: str, limits: KeyLimits, tokens: int = 0) -> bool:
    try:
        live.limiter.reserve(key, limits, tokens).settle(None)
    except RateLimited:
        return False
    return True


async def test_low_allowances_are_topped_up_to_a_slice_in_one_round_trip() -> None:
    clock = FakeClock()
    store = MemoryStore(clock)
    loop, live, _ = gateway(store, clock)
    assert not served(live, "r", RPM)  # nothing leased before the first tick
    assert await loop.tick() == BUSY_TICK_S
    assert store.trips == 1
    assert live.limiter.allowance("r", "requests").level == 3
    assert live.limiter.allowance("t", "tokens").level == 50
    assert store.rows["r", "requests"] == (57, 1000) and store.rows["t", "tokens"][0] == 950
    assert await loop.tick() == BUSY_TICK_S  # the levels moved since the last tick
    assert await loop.tick() == IDLE_TICK_S and store.trips == 1  # nothing low: no trip
    assert served(live, "r", RPM) and served(live, "r", RPM)  # 1 left: below the floor
    assert await loop.tick() == BUSY_TICK_S and store.trips == 2
    assert live.limiter.allowance("r", "requests").level == 3
    assert store.rows["r", "requests"][0] == 55 and store.rows["t", "tokens"][0] == 950


async def test_two_gateways_serve_one_global_bucket_between_them() -> None:
    """A key served as fast as two gateways allow for 10 s: the 60 of the full bucket and
    the 10 its refill brings, less at most the slice each still holds; one gateway alone
    would have served 70 by itself."""
    clock = FakeClock()
    store = MemoryStore(clock)
    (a, live_a, _), (b, live_b, _) = gateway(store, clock), gateway(store, clock)
    total = 0
    for _ in range(200):  # 10 s in ticks of 50 ms
        await a.tick()
        await b.tick()
        total += sum(served(live, "r", RPM) for live in (live_a, live_b) for _ in range(5))
        clock.now += 0.05
    assert 70 - 2 * 3 <= total <= 70


async def test_under_deny_an_outage_serves_what_is_held_then_refuses_and_says_why(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock()
    store = MemoryStore(clock)
    loop, live, errors = gateway(store, clock, "deny")
    await loop.tick()
    store.down = True
    assert await loop.tick() == BUSY_TICK_S and errors == []  # nothing low: no trip to fail
    assert served(live, "r", RPM) and served(live, "r", RPM)
    with caplog.at_level(logging.INFO, "gateway.control.limits_store"):
        assert await loop.tick() == DOWN_TICK_S
        clock.now += 5
        assert await loop.tick() == DOWN_TICK_S  # every trip till it is back: t's too
        assert len(errors) == 2
        assert [r.levelname for r in caplog.records] == ["WARNING"]  # once a streak
        assert "store_unavailable is deny" in caplog.records[0].getMessage()
        assert [served(live, "r", RPM) for _ in range(2)] == [True, False]
        with pytest.raises(RateLimited, match=r"unavailable for 5 s .* no more of the limit"):
            live.limiter.reserve("r", RPM, 0)
        assert live.limiter.allowance("r", "requests").level == 0  # nothing comes meanwhile
        store.down = False
        await loop.tick()
        assert caplog.records[-1].levelname == "INFO" and "after 5.0 s" in caplog.messages[-1]
    assert loop.down_since is None and live.limiter.allowance("r", "requests").at_s == STORE_UP
    assert [served(live, "r", RPM) for _ in range(3)] == [True] * 3
    with pytest.raises(RateLimited, match=r"share of the limit, leased in slices .* used up"):
        live.limiter.reserve("r", RPM, 0)


async def test_under_allow_an_outage_refills_from_the_clock_until_the_store_is_back() -> None:
    clock = FakeClock()
    store = MemoryStore(clock)
    loop, live, errors = gateway(store, clock, "allow")
    await loop.tick()
    store.down = True
    for _ in range(3):
        assert served(live, "r", RPM)
    await loop.tick()
    assert errors == [1] and live.limiter.allowance("r", "requests").at_s == STORE_UP
    clock.now += 10  # 10 requests a minute's clock brings
    await loop.tick()
    assert live.limiter.allowance("r", "requests").level == 10
    clock.now += 600
    await loop.tick()
    assert live.limiter.allowance("r", "requests").level == 60  # a full bucket at most
    assert live.limiter.allowance("t", "tokens").level == 1000
    store.down = False
    await loop.tick()  # back: what the clock added is cut to a slice
    assert live.limiter.allowance("r", "requests").level == 3
    assert live.limiter.allowance("t", "tokens").level == 50


async def test_at_shutdown_the_allowance_held_goes_back_to_the_store() -> None:
    clock = FakeClock()
    store = MemoryStore(clock)
    loop, live, _ = gateway(store, clock)
    await loop.tick()
    assert served(live, "t", TPM, 20)
    app: Any = None
    lifetime = loop.lifetime(app)
    await anext(lifetime)
    with pytest.raises(StopAsyncIteration):
        await anext(lifetime)
    assert store.rows["t", "tokens"][0] == 980 and store.rows["r", "requests"][0] == 60
    assert live.limiter.allowance("t", "tokens").level == 0 and store.closed


async def test_nothing_goes_back_while_the_store_is_unavailable() -> None:
    clock = FakeClock()
    store = MemoryStore(clock)
    loop, live, _ = gateway(store, clock, "allow")
    await loop.tick()
    store.down = True
    assert served(live, "r", RPM) and served(live, "r", RPM)
    await loop.tick()
    trips = store.trips
    await loop.hand_back()
    assert store.trips == trips and live.limiter.allowance("t", "tokens").level == 50

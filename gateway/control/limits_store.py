"""Keys' limits shared by several gateways (`flow_control.store: postgresql://...`), with no
database round trip on a request's path: the loop that feeds each gateway's limiter
(gateway/flow/limits.py, `Leased`) its allowance, in slices leased from one PostgreSQL table.

The table holds one global token bucket per key and limit (`requests` or `tokens`), of the
key's per-minute limit L, refilled at L per minute on the database's clock. A lease is one
upsert for every key that needs a slice: it refills each row, takes min(wanted, level) and
returns what it took (a row is made full on first use). Rows are taken in (key, kind) order, so
two gateways leasing at once wait for each other's rows, never deadlock.

The loop runs in one process per gateway (the only one, or worker 0 of `workers: N`, whose
limiter table the other workers share). Every tick it reads each configured key's allowance;
one below half a slice (`store_slice_percent` of L, at least 1) is topped up to a slice, every
such key in one round trip. It ticks every BUSY_TICK_S while allowances move and IDLE_TICK_S
when they do not; at shutdown the allowance held goes back to the table.

The bound, for one key with G gateways: what a gateway serves was granted from the global
bucket first, or is a debt its next slice pays. So over any t seconds from the start the
gateways together serve at most L + L*t/60 (as one gateway's own bucket would), plus the debts
they carry: usage over reservations, and a request that passed at the floor when it asked more
than the allowance held (at most one reservation per gateway). Allowance held but not used is
what the others cannot have: at most one slice per gateway (plus refunds of requests in flight)
is under-served, and a window that starts later may spend it on top.

When the store cannot be reached (refused, timed out, any asyncpg or OS error) the loop logs
once per streak (a warning, and info on recovery), counts every failed round trip (`on_error`)
and tries again every DOWN_TICK_S; `flow_control.store_unavailable` says what keys get
meanwhile. `allow`: each gateway refills its allowance from its own clock, enforcing each limit
alone (G gateways may pass G*L a minute). `deny`: only the allowance already held, then 429s
that say the store is unavailable (the buckets are marked, so every worker's refusals say it).
On recovery every allowance is cut to one slice (what the clock added was never leased) and
leasing resumes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import asyncpg
from aiohttp import web

from gateway.config import GatewayConfig
from gateway.flow.limits import Kind, Leased
from gateway.pool.live import Live

log = logging.getLogger(__name__)

BUSY_TICK_S = 0.05
IDLE_TICK_S = 0.5
DOWN_TICK_S = 0.5
STORE_TIMEOUT_S = 2.0  # one round trip, connecting included
SCHEMA_LOCK = 0x6C696D74  # pg_advisory_xact_lock key: 'limt'
NOW = "extract(epoch FROM clock_timestamp())"
UNAVAILABLE = (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)

SCHEMA = """
CREATE TABLE IF NOT EXISTS infergate_limit_buckets (
    key text NOT NULL,
    kind text NOT NULL,
    capacity double precision NOT NULL,  -- the limit per minute, as last asked
    level double precision NOT NULL,  -- what is left, as of `at`
    at double precision NOT NULL,  -- the database's clock, epoch seconds
    granted double precision NOT NULL,  -- the last change a gateway made (< 0: given back)
    PRIMARY KEY (key, kind)
)"""
# The row refilled to the proposed row's time, at its capacity (a lowered one clamps it).
REFILLED = (
    "least(excluded.capacity, b.level + greatest(0, excluded.at - b.at) * excluded.capacity / 60)"
)
TAKEN = f"least(excluded.granted, greatest(0, {REFILLED}))"
ASKS = (
    "FROM unnest($1::text[], $2::text[], $3::float8[], $4::float8[])"
    " AS a (key, kind, capacity, amount) ORDER BY key, kind"
)
LEASE = f"""
INSERT INTO infergate_limit_buckets AS b (key, kind, capacity, level, at, granted)
SELECT key, kind, capacity, capacity - least(amount, capacity), {NOW}, least(amount, capacity)
{ASKS}
ON CONFLICT (key, kind) DO UPDATE SET granted = {TAKEN}, level = {REFILLED} - {TAKEN},
    capacity = excluded.capacity, at = excluded.at
RETURNING key, kind, granted"""
GIVE_BACK = f"""
INSERT INTO infergate_limit_buckets AS b (key, kind, capacity, level, at, granted)
SELECT key, kind, capacity, capacity, {NOW}, -amount
{ASKS}
ON CONFLICT (key, kind) DO UPDATE SET
    level = least(excluded.capacity, {REFILLED} - excluded.granted),
    granted = excluded.granted, capacity = excluded.capacity, at = excluded.at"""


@dataclass(frozen=True)
class Ask:
    """Of one key's global bucket: `amount` wanted (a lease) or handed back."""

    key: str
    kind: Kind
    capacity: int
    amount: float


class Store(Protocol):
    """The global buckets. A store that cannot be reached raises one of UNAVAILABLE."""

    async def lease(self, asks: Sequence[Ask]) -> dict[tuple[str, Kind], float]: ...

    async def give_back(self, asks: Sequence[Ask]) -> None: ...

    async def close(self) -> None: ...


class LimitsStore:
    """The global buckets in PostgreSQL. It connects on first use (a store down at start-up is
    an outage like any other) and makes its table then, under an advisory lock."""

    def __init__(self, url: str) -> None:
        self._url = url
        self._pool: asyncpg.Pool | None = None
        self._made = False

    async def lease(self, asks: Sequence[Ask]) -> dict[tuple[str, Kind], float]:
        """What each ask got (every ask once); no asks: a round trip that proves the store."""
        async with asyncio.timeout(STORE_TIMEOUT_S):
            pool = await self._ready()
            rows = await pool.fetch(LEASE, *_columns(asks))
        return {(row["key"], row["kind"]): row["granted"] for row in rows}

    async def give_back(self, asks: Sequence[Ask]) -> None:
        async with asyncio.timeout(STORE_TIMEOUT_S):
            pool = await self._ready()
            await pool.execute(GIVE_BACK, *_columns(asks))

    async def close(self) -> None:
        if self._pool is not None:
            try:
                async with asyncio.timeout(STORE_TIMEOUT_S):
                    await self._pool.close()
            except TimeoutError:
                self._pool.terminate()

    async def _ready(self) -> asyncpg.Pool:
        if self._pool is None:
            self._pool = await asyncpg.create_pool(
                self._url, min_size=0, max_size=2, timeout=STORE_TIMEOUT_S
            )
        if not self._made:
            async with self._pool.acquire() as db, db.transaction():
                await db.execute("SELECT pg_advisory_xact_lock($1)", SCHEMA_LOCK)
                await db.execute(SCHEMA)
            self._made = True
        return self._pool


def _columns(asks: Sequence[Ask]) -> tuple[list[str], list[str], list[float], list[float]]:
    return (
        [a.key for a in asks], [a.kind for a in asks],
        [float(a.capacity) for a in asks], [a.amount for a in asks],
    )  # fmt: skip


def wanted(config: GatewayConfig) -> Iterator[tuple[str, Kind, int]]:
    """(key, kind, per-minute limit) of every configured key's per-minute limits."""
    auth = config.auth
    for key in auth.api_keys if auth is not None else ():
        limits = key.limits
        if limits is not None and limits.requests_per_minute is not None:
            yield key.name, "requests", limits.requests_per_minute
        if limits is not None and limits.tokens_per_minute is not None:
            yield key.name, "tokens", limits.tokens_per_minute


class LimitsLoop:
    """Keeps this gateway's allowance of each configured key topped up from the store.
    `lifetime` is its cleanup_ctx (the hand-back at shutdown); `run` its background task."""

    def __init__(
        self, live: Live, store: Store, *, on_error: Callable[[], None] = lambda: None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:  # fmt: skip
        if live.limiter.leased is None:
            raise ValueError("the gateway's limiter is not leased (flow_control.store)")
        self._live, self._store, self._on_error = live, store, on_error
        self._clock, self._sleep = clock, sleep
        self._leased: Leased = live.limiter.leased
        self.down_since: float | None = None  # the loop's clock, while the store is unavailable
        self._refilled_at = 0.0  # `allow`: when the clock last refilled the allowances
        self._levels: dict[tuple[str, Kind], float] = {}  # as the last tick saw them
        self._held: dict[tuple[str, Kind], int] = {}  # leased to at some point: its capacity

    async def lifetime(self, app: web.Application) -> AsyncIterator[None]:
        await self.tick()  # the first slices before the first request (or the first failure)
        yield
        await self.hand_back()
        await self._store.close()

    async def run(self) -> None:
        while True:
            await self._sleep(await self.tick())

    async def tick(self) -> float:
        """One round; returns the seconds until the next."""
        limiter, now = self._live.limiter, self._clock()
        keys = list(wanted(self._live.runtime.config))
        if self.down_since is not None and self._policy() == "allow":
            self._refill_from_clock(keys, now)
        buckets = {(key, kind): limiter.allowance(key, kind) for key, kind, _ in keys}
        asks = [
            Ask(key, kind, capacity, self._leased.slice(capacity) - level)
            for key, kind, capacity in keys
            if (level := buckets[key, kind].level) < self._leased.floor(capacity)
        ]
        levels = {name: bucket.level for name, bucket in buckets.items()}
        moving, self._levels = bool(asks) or levels != self._levels, levels
        if asks or self.down_since is not None:
            await self._lease(asks, keys, now)
        if self.down_since is not None:
            return DOWN_TICK_S
        return BUSY_TICK_S if moving else IDLE_TICK_S

    async def hand_back(self) -> None:
        """The allowance held goes back to the store (not what the clock added in an outage:
        that never came from it)."""
        if self.down_since is not None:
            return
        asks = []
        for (key, kind), capacity in self._held.items():
            held = -self._live.limiter.grant(key, kind, 0.0, cap=0.0)
            if held > 0:
                asks.append(Ask(key, kind, capacity, held))
        if asks:
            try:
                await self._store.give_back(asks)
            except UNAVAILABLE as exc:
                self._on_error()
                log.warning("limits store: the allowance held was not handed back: %r", exc)

    async def _lease(self, asks: list[Ask], keys: list[tuple[str, Kind, int]], now: float) -> None:
        try:
            granted = await self._store.lease(asks)
        except UNAVAILABLE as exc:
            self._failed(exc, keys, now)
            return
        if self.down_since is not None:
            self._recovered(keys, now)
        for ask in asks:
            self._live.limiter.grant(ask.key, ask.kind, granted.get((ask.key, ask.kind), 0.0))
            self._held[ask.key, ask.kind] = ask.capacity

    def _failed(self, exc: BaseException, keys: list[tuple[str, Kind, int]], now: float) -> None:
        self._on_error()
        policy = self._policy()
        if self.down_since is None:
            self.down_since = self._refilled_at = now
            log.warning("limits store unavailable (%r); %s", exc, OUTAGE[policy])
        for key, kind, _ in keys:  # every round: keys added meanwhile, a reload's policy
            self._live.limiter.mark(key, kind, store_down=policy == "deny")

    def _recovered(self, keys: list[tuple[str, Kind, int]], now: float) -> None:
        assert self.down_since is not None
        log.info(
            "limits store reachable again after %.1f s: keys' limits are leased from it again",
            now - self.down_since,
        )
        self.down_since = None
        for key, kind, capacity in keys:
            self._live.limiter.mark(key, kind, store_down=False)
            self._live.limiter.grant(key, kind, 0.0, cap=self._leased.slice(capacity))

    def _refill_from_clock(self, keys: list[tuple[str, Kind, int]], now: float) -> None:
        elapsed_s, self._refilled_at = max(0.0, now - self._refilled_at), now
        for key, kind, capacity in keys:
            self._live.limiter.grant(key, kind, elapsed_s * capacity / 60, cap=capacity)

    def _policy(self) -> Literal["allow", "deny"]:
        flow = self._live.runtime.config.flow_control
        return flow.store_unavailable if flow is not None else "allow"


OUTAGE = {
    "allow": "flow_control.store_unavailable is allow: each gateway now refills its keys' "
    "limits from its own clock and enforces them alone, so G gateways may pass up to G times "
    "each limit until the store is back",
    "deny": "flow_control.store_unavailable is deny: keys get only the allowance this gateway "
    "holds, then 429s, until the store is back",
}

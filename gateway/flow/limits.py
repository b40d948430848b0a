"""Per-key limits (config `auth.api_keys[].limits`): requests and tokens per minute, requests in
parallel, checked and taken at admission and settled when the response's usage is known.

Each per-minute limit is a token bucket that holds one minute's worth (its capacity is the
limit), starts full and refills continuously at limit/60 per second. A request takes 1 from the
requests bucket and its reserved tokens (prompt + max_tokens) from the tokens bucket, and holds
one of the key's in-flight slots until it settles: then the tokens it did not use go back, and
tokens used over the reservation are taken too, even below zero (a debt later requests wait
out). A refusal is a 429 that says which limit, its value and when to retry; headers carry
OpenAI's `x-ratelimit-*` values.

Several gateways (`flow_control.store`) share each limit through a store instead
(gateway/control/limits_store.py): then a limiter is `Leased`, and a bucket's level is this
gateway's *allowance*, which only the store loop's `grant`s raise (nothing refills it from the
clock). Reservations and settlements work on it unchanged: refunds return to it, debts take it
below zero and the next slice pays them. The loop tops it up whenever it is below its `floor`
(half a slice); at or above the floor any request passes, one asking more than is there leaving
a debt, so a request larger than a slice is never stuck. A refusal's wait is the time the
store's bucket takes to refill what is missing (at least 1 s); the headers show this gateway's
share. A leased bucket's time is no refill time: it says since when the store has been
unavailable (STORE_UP: it answers), so the refusals of every worker can say so.

The rules are pure functions of one key's state (`KeyState`); where the states live is a
`Table`, whose `update` runs the check-and-take under its lock: `LocalTable` for one process,
`SharedBuckets` (buckets_shared.py) for the workers of `workers: N`.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Literal, Protocol, TypeVar

from gateway.config import KeyLimits
from gateway.errors import GatewayError

T = TypeVar("T")
MINUTE_S = 60.0
STORE_UP = 0.0  # a leased bucket's time while the limits store answers
Code = Literal["requests", "tokens", "parallel_requests", "request_too_large"]
Kind = Literal["requests", "tokens"]  # the per-minute limits, each a bucket


@dataclass(frozen=True)
class Bucket:
    """A bucket's level as of `at_s` (the limiter's clock). A bucket never used is full: its
    infinite level is clamped to the capacity on the first refill."""

    level: float = math.inf
    at_s: float = 0.0

    def refilled(self, capacity: int, now_s: float) -> Bucket:
        """The level at `now_s`; a capacity lowered since (a reload) clamps it, a raised one
        does not fill it."""
        gained = max(0.0, now_s - self.at_s) * capacity / MINUTE_S
        return Bucket(min(float(capacity), self.level + gained), now_s)

    def leased(self) -> Bucket:
        """As a leased bucket: one never used holds no allowance yet."""
        return self if math.isfinite(self.level) else Bucket(0.0, self.at_s)


@dataclass
class KeyState:
    requests: Bucket = field(default_factory=Bucket)
    tokens: Bucket = field(default_factory=Bucket)
    in_flight: int = 0  # reserved, not yet settled (counted whether max_parallel is set or not)

    def bucket(self, kind: Kind) -> Bucket:
        return self.requests if kind == "requests" else self.tokens

    def put(self, kind: Kind, bucket: Bucket) -> None:
        if kind == "requests":
            self.requests = bucket
        else:
            self.tokens = bucket


@dataclass(frozen=True)
class Leased:
    """How a limiter refills when its keys' limits are leased from a store: by grants."""

    slice_percent: float  # flow_control.store_slice_percent

    def slice(self, capacity: int) -> float:
        """What a lease tops an allowance up to: a share of the per-minute limit, at least 1."""
        return max(1.0, capacity * self.slice_percent / 100)

    def floor(self, capacity: int) -> float:
        """Below it the store loop leases; at or above it any request passes."""
        return self.slice(capacity) / 2


class Table(Protocol):
    """Where keys' states live. `update` runs `change` on a key's state (a new key's is
    `KeyState()`) under the table's lock, keeps the state it leaves and returns its result; if
    `change` raises, the key's state stays as it was."""

    def update(self, key: str, change: Callable[[KeyState], T]) -> T: ...


class LocalTable:
    """The states of one process's keys."""

    def __init__(self) -> None:
        self._states: dict[str, KeyState] = {}
        self._lock = threading.Lock()

    def update(self, key: str, change: Callable[[KeyState], T]) -> T:
        with self._lock:
            state = replace(self._states.get(key) or KeyState())  # buckets are frozen
            result = change(state)
            self._states[key] = state
            return result


class RateLimited(GatewayError):
    """A key over one of its limits; `code` says which."""

    status = 429
    error_type = "rate_limit_exceeded"

    def __init__(self, code: Code, message: str, headers: dict[str, str]) -> None:
        super().__init__(message, headers)
        self.code: Code = code


@dataclass
class Reservation:
    """One request's share of its key's limits, from admission until `settle`."""

    key: str
    tokens: int
    limits: KeyLimits
    _headers: dict[str, str] = field(repr=False)
    _limiter: Limiter = field(repr=False)
    settled: bool = False

    def headers(self) -> dict[str, str]:
        """OpenAI's `x-ratelimit-*` headers as they stood right after the reservation."""
        return dict(self._headers)

    def settle(self, used_tokens: int | None) -> None:
        """Frees the in-flight slot and gives back the tokens not used (takes those used over
        the reservation); None keeps the reservation as used. Only the first call counts."""
        if self.settled:
            return
        self.settled = True
        refund = 0 if used_tokens is None else self.tokens - max(0, used_tokens)
        self._limiter.refund(self.key, self.limits.tokens_per_minute, refund)


class Limiter:
    def __init__(
        self, table: Table, clock: Callable[[], float] = time.monotonic, *,
        leased: Leased | None = None,
    ) -> None:  # fmt: skip
        self._table, self._clock = table, clock
        self.leased = leased  # None: the buckets refill from the clock

    def reserve(self, key: str, limits: KeyLimits, tokens: int) -> Reservation:
        """Checks every limit of `key` and takes them all, or raises RateLimited."""
        headers = self._table.update(
            key, lambda state: _take(state, key, limits, tokens, self._clock(), self.leased)
        )
        return Reservation(key, tokens, limits, headers, self)

    def refund(self, key: str, capacity: int | None, tokens: int) -> None:
        """A reservation settles: its in-flight slot is free, `tokens` go back (or, below zero,
        are taken)."""
        self._table.update(
            key, lambda state: _give_back(state, capacity, tokens, self._clock(), self.leased)
        )

    # The store loop's side (leased mode): gateway/control/limits_store.py

    def allowance(self, key: str, kind: Kind) -> Bucket:
        """A key's leased bucket: its level is the allowance, its time the store's mark."""
        return self._table.update(key, lambda state: state.bucket(kind).leased())

    def grant(self, key: str, kind: Kind, amount: float, *, cap: float = math.inf) -> float:
        """Adds `amount` to a key's allowance, keeping it at most `cap` (one above it comes
        down to it); returns the change made."""

        def change(state: KeyState) -> float:
            bucket = state.bucket(kind).leased()
            level = min(cap, bucket.level + amount)
            state.put(kind, Bucket(level, bucket.at_s))
            return level - bucket.level

        return self._table.update(key, change)

    def mark(self, key: str, kind: Kind, *, store_down: bool) -> None:
        """Records on a key's bucket whether the store is unavailable (since now, unless it
        was already), for the refusals of every worker to say."""

        def change(state: KeyState) -> None:
            bucket = state.bucket(kind).leased()
            since = bucket.at_s if bucket.at_s != STORE_UP else self._clock()
            state.put(kind, Bucket(bucket.level, since if store_down else STORE_UP))

        self._table.update(key, change)


@dataclass(frozen=True)
class _Ask:
    """What a request asks of one bucket, refilled to now; it passes once the level reaches
    `enough` (the amount; in leased mode at most the floor)."""

    kind: Kind
    capacity: int
    bucket: Bucket
    amount: int
    enough: float
    leased: bool = False
    down_s: float | None = None  # leased: how long the store has been unavailable, if it is

    @property
    def wait_s(self) -> float:
        """Until the clock (or, leased, the store's refill) brings the level to `enough`."""
        return max(0.0, self.enough - self.bucket.level) * MINUTE_S / self.capacity

    def headers(self, level: float) -> dict[str, str]:
        return {
            f"x-ratelimit-limit-{self.kind}": str(self.capacity),
            f"x-ratelimit-remaining-{self.kind}": str(math.floor(max(0.0, level))),
            f"x-ratelimit-reset-{self.kind}": go_duration(
                (self.capacity - level) * MINUTE_S / self.capacity
            ),
        }


def _take(
    state: KeyState, key: str, limits: KeyLimits, tokens: int, now_s: float,
    leased: Leased | None,
) -> dict[str, str]:  # fmt: skip
    """Takes what the request asks from `state` and returns its headers, or raises."""
    wanted: tuple[tuple[Kind, int | None, int], ...] = (
        ("requests", limits.requests_per_minute, 1),
        ("tokens", limits.tokens_per_minute, tokens),
    )
    asks = [
        _ask(state.bucket(kind), kind, capacity, amount, now_s, leased)
        for kind, capacity, amount in wanted
        if capacity is not None
    ]
    _check(key, limits, tokens, state.in_flight, asks)
    headers: dict[str, str] = {}
    for ask in asks:
        taken = Bucket(ask.bucket.level - ask.amount, ask.bucket.at_s)
        state.put(ask.kind, taken)
        headers |= ask.headers(taken.level)
    state.in_flight += 1
    return headers


def _ask(
    bucket: Bucket, kind: Kind, capacity: int, amount: int, now_s: float, leased: Leased | None
) -> _Ask:
    if leased is None:
        return _Ask(kind, capacity, bucket.refilled(capacity, now_s), amount, amount)
    bucket = bucket.leased()
    down_s = None if bucket.at_s == STORE_UP else max(0.0, now_s - bucket.at_s)
    enough = min(float(amount), leased.floor(capacity))
    return _Ask(kind, capacity, bucket, amount, enough, True, down_s)


def _standing(asks: list[_Ask]) -> dict[str, str]:
    """The rate-limit headers as the buckets stand, nothing taken (a refusal's)."""
    return {name: value for ask in asks for name, value in ask.headers(ask.bucket.level).items()}


def _check(key: str, limits: KeyLimits, tokens: int, in_flight: int, asks: list[_Ask]) -> None:
    tpm = limits.tokens_per_minute
    if tpm is not None and tokens > tpm:
        raise RateLimited(
            "request_too_large",
            f"key '{key}' asked for {tokens} tokens, more than its whole tokens_per_minute limit "
            f"of {tpm}: lower max_tokens or the prompt",
            _standing(asks),
        )
    if limits.max_parallel is not None and in_flight >= limits.max_parallel:
        raise RateLimited(
            "parallel_requests",
            f"key '{key}' is over its max_parallel limit of {limits.max_parallel}: "
            f"{in_flight} requests in flight; retry when one of them finishes",
            {"Retry-After": "1", **_standing(asks)},
        )
    short = [ask for ask in asks if ask.wait_s > 0]
    if short:
        worst = max(short, key=lambda ask: ask.wait_s)  # retrying after it passes them all
        raise RateLimited(
            worst.kind,
            _over(key, worst),
            {"Retry-After": _retry_after(worst.wait_s), **_standing(asks)},
        )


def _over(key: str, ask: _Ask) -> str:
    asked = f"{ask.amount} {ask.kind if ask.amount != 1 else ask.kind[:-1]} asked"
    level = ask.bucket.level
    left = (
        f"{math.floor(level)} left"
        if level >= 0
        else f"none left ({math.ceil(-level)} owed by usage over earlier reservations)"
    )
    if ask.down_s is not None:
        left += (
            f"; the limits store has been unavailable for {ask.down_s:.0f} s "
            "(flow_control.store_unavailable: deny), so this gateway gets no more of the limit "
            "until it is back"
        )
    elif ask.leased:
        left += (
            "; this gateway's share of the limit, leased in slices from the limits store that "
            "the gateways share, is used up"
        )
    wait = math.ceil(ask.wait_s * 10 - 1e-9) / 10
    return (
        f"key '{key}' is over its {ask.kind}_per_minute limit of {ask.capacity}: {asked}, "
        f"{left}; retry in {wait:.1f} s"
    )


def _retry_after(wait_s: float) -> str:
    return str(max(1, math.ceil(wait_s - 1e-9)))


def _give_back(
    state: KeyState, capacity: int | None, refund: int, now_s: float, leased: Leased | None
) -> None:
    state.in_flight -= 1
    if capacity is not None and refund:
        bucket = state.tokens.leased() if leased else state.tokens.refilled(capacity, now_s)
        level = min(float(capacity), bucket.level + refund)  # a debt stays below zero
        state.tokens = Bucket(level, bucket.at_s)


def go_duration(seconds: float) -> str:
    """A wait as OpenAI's reset headers write it (Go's duration style, to the millisecond,
    rounded up): "0s", "20ms", "1.5s", "6m0s", "1h0m0s"."""
    ms = math.ceil(seconds * 1000 - 1e-6)
    if ms <= 0:
        return "0s"
    if ms < 1000:
        return f"{ms}ms"
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    text = f"{rest // 1000}.{rest % 1000:03d}".rstrip("0").rstrip(".") + "s"
    if hours or minutes:
        text = f"{minutes}m{text}"
    return f"{hours}h{text}" if hours else text

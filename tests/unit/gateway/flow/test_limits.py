"""Per-key limits on a fake clock: buckets that start full and refill at limit/60 per second,
each limit refusing with its code, message and Retry-After, reservations settled from usage
(given back, a debt, kept), the x-ratelimit headers, and limits changed by a reload; and the
leased mode of several gateways, where only grants fill a bucket."""

from __future__ import annotations

import pytest

from gateway.config import KeyLimits
from gateway.errors import GatewayError
from gateway.flow.limits import (
    STORE_UP,
    KeyState,
    Leased,
    Limiter,
    LocalTable,
    RateLimited,
    Reservation,
    go_duration,
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def limiter() -> tuple[Limiter, LocalTable, FakeClock]:
    table, clock = LocalTable(), FakeClock()
    return Limiter(table, clock), table, clock


def refused(limiter: Limiter, key: str, limits: KeyLimits, tokens: int) -> RateLimited:
    with pytest.raises(RateLimited) as caught:
        limiter.reserve(key, limits, tokens)
    return caught.value


def in_flight(table: LocalTable, key: str) -> int:
    return table.update(key, lambda state: state.in_flight)


def state(table: LocalTable, key: str) -> KeyState:
    return table.update(key, lambda state: state)


def test_a_bucket_starts_full_and_refills_at_its_limit_per_minute() -> None:
    limits = KeyLimits(requests_per_minute=60)
    lim, _, clock = limiter()
    for _ in range(60):
        lim.reserve("a", limits, 0).settle(None)
    assert refused(lim, "a", limits, 0).code == "requests"
    clock.now += 0.5  # half a request back
    assert "retry in 0.5 s" in str(refused(lim, "a", limits, 0))
    clock.now += 0.5
    lim.reserve("a", limits, 0)
    clock.now += 30
    for _ in range(30):
        lim.reserve("a", limits, 0)
    refused(lim, "a", limits, 0)
    clock.now += 3600  # never past full
    for _ in range(60):
        lim.reserve("a", limits, 0)
    refused(lim, "a", limits, 0)
    lim.reserve("b", limits, 0)  # each key its own buckets


def test_over_requests_per_minute() -> None:
    limits = KeyLimits(requests_per_minute=2)
    lim, _, clock = limiter()
    lim.reserve("team-a", limits, 10)
    lim.reserve("team-a", limits, 10)
    clock.now += 1.5  # 0.05 back of the 1 needed: 28.5 s to go
    error = refused(lim, "team-a", limits, 10)
    assert isinstance(error, GatewayError) and (error.status, error.error_type) == (
        429,
        "rate_limit_exceeded",
    )
    assert error.code == "requests"
    assert str(error) == (
        "key 'team-a' is over its requests_per_minute limit of 2: 1 request asked, 0 left; "
        "retry in 28.5 s"
    )
    assert error.headers == {
        "Retry-After": "29",
        "x-ratelimit-limit-requests": "2",
        "x-ratelimit-remaining-requests": "0",
        "x-ratelimit-reset-requests": "58.5s",
    }


def test_over_tokens_per_minute() -> None:
    limits = KeyLimits(tokens_per_minute=12000)  # 200 a second
    lim, table, _ = limiter()
    lim.reserve("team-a", limits, 11880)
    error = refused(lim, "team-a", limits, 512)
    assert error.code == "tokens"
    assert str(error) == (
        "key 'team-a' is over its tokens_per_minute limit of 12000: 512 tokens asked, 120 left; "
        "retry in 2.0 s"  # 392 tokens at 200 a second: 1.96 s
    )
    assert error.headers["Retry-After"] == "2"
    assert error.headers["x-ratelimit-remaining-tokens"] == "120"
    assert "x-ratelimit-limit-requests" not in error.headers  # only the limits set
    assert in_flight(table, "team-a") == 1  # the refusal took nothing
    lim.reserve("team-a", limits, 120)


def test_the_retry_covers_every_limit_that_is_short() -> None:
    limits = KeyLimits(requests_per_minute=60, tokens_per_minute=600)  # 1 and 10 a second
    lim, _, _ = limiter()
    for _ in range(60):
        lim.reserve("a", limits, 10).settle(None)  # 0 requests left, 0 tokens left
    error = refused(lim, "a", limits, 50)  # requests back in 1 s, tokens in 5 s
    assert (error.code, error.headers["Retry-After"]) == ("tokens", "5")


def test_over_max_parallel_until_one_settles() -> None:
    limits = KeyLimits(max_parallel=2)
    lim, table, _ = limiter()
    first, _ = lim.reserve("a", limits, 1), lim.reserve("a", limits, 1)
    error = refused(lim, "a", limits, 1)
    assert error.code == "parallel_requests"
    assert str(error) == (
        "key 'a' is over its max_parallel limit of 2: 2 requests in flight; "
        "retry when one of them finishes"
    )
    assert error.headers == {"Retry-After": "1"}
    first.settle(1)
    assert in_flight(table, "a") == 1
    lim.reserve("a", limits, 1)


def test_a_request_larger_than_the_whole_bucket_is_never_retried() -> None:
    limits = KeyLimits(requests_per_minute=10, tokens_per_minute=1000)
    lim, table, _ = limiter()
    error = refused(lim, "a", limits, 1001)
    assert error.code == "request_too_large"
    assert str(error) == (
        "key 'a' asked for 1001 tokens, more than its whole tokens_per_minute limit of 1000: "
        "lower max_tokens or the prompt"
    )
    assert "Retry-After" not in error.headers
    assert error.headers["x-ratelimit-remaining-requests"] == "10"  # nothing taken
    assert in_flight(table, "a") == 0
    lim.reserve("a", limits, 1000)


def test_settling_gives_back_what_went_unused() -> None:
    limits = KeyLimits(tokens_per_minute=1000)
    lim, table, clock = limiter()
    reservation = lim.reserve("a", limits, 600)
    assert reservation.headers()["x-ratelimit-remaining-tokens"] == "400"
    reservation.settle(100)
    reservation.settle(100)  # once only
    assert (state(table, "a").tokens.level, in_flight(table, "a")) == (900, 0)
    full = lim.reserve("a", limits, 500)
    clock.now += 60  # full again meanwhile: what comes back stops at the capacity
    full.settle(0)
    assert state(table, "a").tokens.level == 1000


def test_usage_over_the_reservation_is_a_debt_waited_out() -> None:
    limits = KeyLimits(tokens_per_minute=600)  # 10 a second
    lim, table, clock = limiter()
    lim.reserve("a", limits, 500).settle(800)  # 200 over what was there
    assert state(table, "a").tokens.level == -200
    error = refused(lim, "a", limits, 0)
    assert str(error) == (
        "key 'a' is over its tokens_per_minute limit of 600: 0 tokens asked, none left "
        "(200 owed by usage over earlier reservations); retry in 20.0 s"
    )
    assert error.headers["x-ratelimit-remaining-tokens"] == "0"
    assert error.headers["x-ratelimit-reset-tokens"] == "1m20s"
    clock.now += 20
    lim.reserve("a", limits, 0)


def test_settling_without_usage_keeps_the_reservation() -> None:
    limits = KeyLimits(tokens_per_minute=1000, max_parallel=1)
    lim, table, _ = limiter()
    reservation = lim.reserve("a", limits, 300)
    reservation.settle(None)
    reservation.settle(0)  # too late: the first settlement stands
    assert (state(table, "a").tokens.level, in_flight(table, "a")) == (700, 0)
    assert reservation.settled and isinstance(reservation, Reservation)


def test_headers_after_the_reservation() -> None:
    limits = KeyLimits(requests_per_minute=60, tokens_per_minute=1000)
    lim, _, clock = limiter()
    assert lim.reserve("a", limits, 250).headers() == {
        "x-ratelimit-limit-requests": "60",
        "x-ratelimit-remaining-requests": "59",
        "x-ratelimit-reset-requests": "1s",
        "x-ratelimit-limit-tokens": "1000",
        "x-ratelimit-remaining-tokens": "750",
        "x-ratelimit-reset-tokens": "15s",
    }
    clock.now += 0.25
    headers = lim.reserve("a", limits, 1).headers()
    assert headers["x-ratelimit-remaining-requests"] == "58"  # 58.25
    assert headers["x-ratelimit-reset-requests"] == "1.75s"
    assert lim.reserve("b", KeyLimits(max_parallel=3), 5).headers() == {}


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (-1, "0s"),
        (0.02, "20ms"),
        (0.0004, "1ms"),  # rounded up: waiting that long is enough
        (1, "1s"),
        (1.5, "1.5s"),
        (59.999, "59.999s"),
        (61.25, "1m1.25s"),
        (360, "6m0s"),
        (3600, "1h0m0s"),
        (3725.5, "1h2m5.5s"),
    ],
)
def test_reset_durations_are_written_as_go_does(seconds: float, text: str) -> None:
    assert go_duration(seconds) == text


def test_a_reload_keeps_the_state_and_clamps_it_to_a_lower_limit() -> None:
    lim, table, clock = limiter()
    for _ in range(10):
        lim.reserve("a", KeyLimits(requests_per_minute=100), 0).settle(None)  # 90 left
    lower = lim.reserve("a", KeyLimits(requests_per_minute=50), 0)
    assert lower.headers()["x-ratelimit-remaining-requests"] == "49"
    higher = lim.reserve("a", KeyLimits(requests_per_minute=200), 0)  # not filled by it
    assert higher.headers()["x-ratelimit-remaining-requests"] == "48"
    clock.now += 3  # refilled at the new rate: 10 back
    assert state(table, "a").requests.refilled(200, clock.now).level == 58
    assert in_flight(table, "a") == 2


def leased_limiter() -> tuple[Limiter, LocalTable, FakeClock]:
    table, clock = LocalTable(), FakeClock()
    return Limiter(table, clock, leased=Leased(slice_percent=5)), table, clock


def test_a_leased_bucket_holds_only_what_is_granted_and_never_refills_from_the_clock() -> None:
    limits = KeyLimits(requests_per_minute=60)  # a slice: 3, the floor 1.5
    lim, table, clock = leased_limiter()
    assert Leased(5).slice(60) == 3 and Leased(5).slice(10) == 1  # at least 1
    error = refused(lim, "a", limits, 0)  # nothing leased yet
    assert error.code == "requests"
    assert str(error) == (
        "key 'a' is over its requests_per_minute limit of 60: 1 request asked, 0 left; this "
        "gateway's share of the limit, leased in slices from the limits store that the "
        "gateways share, is used up; retry in 1.0 s"
    )
    assert error.headers["Retry-After"] == "1"
    assert lim.grant("a", "requests", 3) == 3
    for _ in range(3):
        lim.reserve("a", limits, 0).settle(None)
    clock.now += 3600  # an hour: nothing back but grants
    refused(lim, "a", limits, 0)
    assert lim.allowance("a", "requests").level == 0
    lim.grant("a", "requests", 1.25)
    assert lim.reserve("a", limits, 0).headers()["x-ratelimit-remaining-requests"] == "0"
    assert state(table, "a").requests.level == 0.25


def test_refunds_and_debts_work_on_the_allowance() -> None:
    limits = KeyLimits(tokens_per_minute=1000)  # a slice: 50, the floor 25
    lim, table, clock = leased_limiter()
    lim.grant("a", "tokens", 50)
    lim.reserve("a", limits, 40).settle(10)  # 30 back
    assert state(table, "a").tokens.level == 40
    clock.now += 60
    lim.reserve("a", limits, 30).settle(100)  # 70 over: a debt
    assert state(table, "a").tokens.level == -60
    error = refused(lim, "a", limits, 1)
    assert "none left (60 owed by usage over earlier reservations)" in str(error)
    assert "retry in 3.7 s" in str(error)  # 61 tokens of the store's 1000 a minute
    assert lim.grant("a", "tokens", 110) == 110  # the next slice pays the debt
    assert lim.allowance("a", "tokens").level == 50


def test_at_the_floor_a_request_larger_than_the_allowance_passes_and_leaves_a_debt() -> None:
    """The store loop stops topping up at the floor (half a slice): a request asking more than
    is held there would otherwise wait for ever."""
    limits = KeyLimits(tokens_per_minute=1000)
    lim, table, _ = leased_limiter()
    lim.grant("a", "tokens", 24)
    error = refused(lim, "a", limits, 200)
    assert "200 tokens asked, 24 left" in str(error) and "retry in 0.1 s" in str(error)
    lim.grant("a", "tokens", 1)
    lim.reserve("a", limits, 200)  # 25 held: the floor
    assert state(table, "a").tokens.level == -175
    refused(lim, "a", limits, 0)
    assert refused(lim, "a", limits, 1001).code == "request_too_large"


def test_a_grant_stops_at_its_cap_and_says_what_it_changed() -> None:
    lim, _, _ = leased_limiter()
    assert lim.grant("a", "tokens", 80, cap=50) == 50
    assert lim.grant("a", "tokens", 0, cap=20) == -30  # brought down to the cap
    assert lim.grant("a", "tokens", 0, cap=0) == -20  # all of it taken back
    lim.grant("a", "tokens", -5)
    assert lim.grant("a", "tokens", 0, cap=0) == 0  # a debt is kept
    assert lim.allowance("b", "requests").level == 0  # a key never seen holds nothing


def test_while_the_store_is_unavailable_the_refusal_says_so() -> None:
    limits = KeyLimits(requests_per_minute=60, tokens_per_minute=6000)
    lim, _, clock = leased_limiter()
    lim.grant("a", "requests", 1)
    lim.grant("a", "tokens", 300)
    lim.mark("a", "requests", store_down=True)
    clock.now += 12
    lim.mark("a", "requests", store_down=True)  # still since the first
    assert lim.allowance("a", "requests").at_s == 1000
    lim.reserve("a", limits, 10)  # what is held still serves
    error = refused(lim, "a", limits, 10)
    assert str(error) == (
        "key 'a' is over its requests_per_minute limit of 60: 1 request asked, 0 left; the "
        "limits store has been unavailable for 12 s (flow_control.store_unavailable: deny), "
        "so this gateway gets no more of the limit until it is back; retry in 1.0 s"
    )
    lim.mark("a", "requests", store_down=False)
    assert lim.allowance("a", "requests").at_s == STORE_UP
    assert "used up" in str(refused(lim, "a", limits, 10))
    assert lim.allowance("a", "tokens").level == 290  # marks keep the allowance

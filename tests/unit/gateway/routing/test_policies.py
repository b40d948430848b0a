"""Policies are pure: statistical checks over seeded draws, no servers."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest

from gateway.pool.replicas import ReplicaPool
from gateway.routing.options import AffinityOptions, PolicyOptions
from gateway.routing.policies import (
    POLICIES,
    Affinity,
    LeastLoaded,
    LeastOutstandingRequests,
    LeastOutstandingTokens,
    PeakEwma,
    PowerOfTwoChoices,
    RandomPolicy,
    RoundRobinPolicy,
    canonical_policy_name,
    make_policy,
)
from gateway.routing.replica import Replica
from gateway.routing.request import NO_INFO, RequestInfo

OPTIONS = PolicyOptions()

DRAWS = 10_000


def _replicas(n: int) -> list[Replica]:
    return [Replica(f"http://127.0.0.1:{9000 + i}") for i in range(n)]


@pytest.mark.parametrize("n", [2, 3, 5])
def test_random_is_uniform_within_5_percent(n: int) -> None:
    replicas = _replicas(n)
    policy = RandomPolicy(random.Random(7), OPTIONS)
    counts = Counter(policy.choose(replicas, NO_INFO).url for _ in range(DRAWS))
    expected = DRAWS / n
    assert set(counts) == {r.url for r in replicas}
    assert all(abs(c - expected) <= 0.05 * expected for c in counts.values()), counts


@pytest.mark.parametrize("n", [1, 3, 7])
def test_round_robin_spreads_evenly(n: int) -> None:
    replicas = _replicas(n)
    policy = RoundRobinPolicy(random.Random(1), OPTIONS)
    picks = [policy.choose(replicas, NO_INFO).url for _ in range(DRAWS)]
    counts = Counter(picks)
    assert len(counts) == n and max(counts.values()) - min(counts.values()) <= 1
    assert all(picks[i] != picks[i + 1] for i in range(len(picks) - 1)) or n == 1


def test_least_outstanding_always_picks_a_minimum() -> None:
    rng = random.Random(3)
    replicas = _replicas(6)
    policy = LeastOutstandingRequests(random.Random(11), OPTIONS)
    for _ in range(DRAWS):
        for r in replicas:
            r.outstanding = rng.choice([0, 1, 2, 3])
        assert policy.choose(replicas, NO_INFO).outstanding == min(r.outstanding for r in replicas)


@pytest.mark.parametrize("counts", [[0, 0, 0, 0], [3, 1, 2, 1], [5, 5, 9, 5]])
def test_least_outstanding_spreads_ties_evenly_not_by_list_order(counts: list[int]) -> None:
    replicas = _replicas(4)
    for r, c in zip(replicas, counts, strict=True):
        r.outstanding = c
    policy = LeastOutstandingRequests(random.Random(5), OPTIONS)
    picks = Counter(policy.choose(replicas, NO_INFO).url for _ in range(DRAWS))
    tied = [r.url for r in replicas if r.outstanding == min(counts)]
    assert sorted(picks) == sorted(tied)
    expected = DRAWS / len(tied)
    assert all(abs(c - expected) <= 0.05 * expected for c in picks.values()), picks


def test_least_outstanding_fills_evenly_under_arrivals_only() -> None:
    replicas = _replicas(3)
    policy = LeastOutstandingRequests(random.Random(0), OPTIONS)
    for _ in range(300):
        policy.choose(replicas, NO_INFO).outstanding += 1
        counts = [r.outstanding for r in replicas]
        assert max(counts) - min(counts) <= 1
    assert [r.outstanding for r in replicas] == [100, 100, 100]


def test_policies_do_not_change_replica_state() -> None:
    replicas = _replicas(3)
    before = [r.as_json() for r in replicas]
    for name in POLICIES:
        policy = make_policy(name, random.Random(0))
        for i in range(10):
            policy.choose(replicas, RequestInfo(tokens=5, key=f"k{i}"))
    assert [r.as_json() for r in replicas] == before


@pytest.mark.parametrize(
    ("spelling", "canonical"),
    [
        ("RANDOM", "random"),
        ("LEAST_OUTSTANDING_REQUESTS", "least_outstanding_requests"),
        ("round-robin", "round_robin"),
    ],
)
def test_sagemaker_spellings_are_aliases(spelling: str, canonical: str) -> None:
    assert canonical_policy_name(spelling) == canonical


def test_unknown_policy_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match="expected one of: random, round_robin"):
        canonical_policy_name("fastest")


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_power_of_two_picks_the_less_loaded_of_two_distinct_draws() -> None:
    replicas = _replicas(4)
    for r, c in zip(replicas, [0, 1, 2, 3], strict=True):
        r.outstanding = c
    policy = PowerOfTwoChoices(random.Random(2), OPTIONS)
    picks = Counter(policy.choose(replicas, NO_INFO).outstanding for _ in range(12_000))
    # Replica k wins when it is drawn with a busier one: P = 2 * (3 - k) / 12 for 4 replicas.
    for k in range(4):
        expected = 12_000 * 2 * (3 - k) / 12
        assert abs(picks[k] - expected) <= 0.05 * 12_000, picks
    assert picks[3] == 0  # the busiest never wins a pair: the two draws are distinct


def test_power_of_two_with_one_replica_returns_it() -> None:
    replicas = _replicas(1)
    assert PowerOfTwoChoices(random.Random(0), OPTIONS).choose(replicas, NO_INFO) is replicas[0]


def test_least_loaded_adds_fresh_reports_of_other_gateways_requests() -> None:
    clock = FakeClock()
    pool = ReplicaPool([f"http://r{i}:1" for i in range(3)], clock=clock)
    a, b, c = pool.active()
    a.outstanding, b.outstanding, c.outstanding = 1, 2, 3
    # b's report says 5 requests of which 2 are ours: 3 came from elsewhere.
    pool.report(b, {"inflight": 5}, ours=2)
    policy = LeastLoaded(random.Random(0), PolicyOptions(feedback_max_age_s=2.0, clock=clock))
    assert {policy.choose(pool.active(), NO_INFO).url for _ in range(50)} == {a.url}
    pool.report(a, {"inflight": 4}, ours=1)  # a: 1 + 3 = 4 > c: 3
    assert {policy.choose(pool.active(), NO_INFO).url for _ in range(50)} == {c.url}
    clock.now += 2.5  # reports older than max_age_s no longer count: local counts decide
    assert {policy.choose(pool.active(), NO_INFO).url for _ in range(50)} == {a.url}


def test_load_report_never_counts_fewer_requests_than_ours() -> None:
    pool = ReplicaPool(["http://r:1"])
    (r,) = pool.active()
    pool.report(r, {"inflight": 1}, ours=3)  # our requests still in transit
    assert r.remote == 0


def test_least_outstanding_tokens_routes_by_work_not_count() -> None:
    pool = ReplicaPool(["http://a:1", "http://b:1"])
    a, b = pool.active()
    pool.acquire(a, tokens=500)  # one long generation
    pool.acquire(b, tokens=20)
    pool.acquire(b, tokens=20)  # two short ones
    policy = LeastOutstandingTokens(random.Random(0), OPTIONS)
    assert policy.choose(pool.active(), RequestInfo(tokens=50)) is b
    pool.progress(a, 490)  # the long one has streamed most of its tokens
    assert policy.choose(pool.active(), RequestInfo(tokens=50)) is a
    pool.release(a, outcome="served", tokens=10)
    assert a.outstanding_tokens == 0 and a.outstanding == 0


def test_least_outstanding_tokens_breaks_equal_work_by_request_count() -> None:
    replicas = _replicas(2)
    replicas[0].outstanding_tokens = replicas[1].outstanding_tokens = 100
    replicas[0].outstanding, replicas[1].outstanding = 3, 1
    policy = LeastOutstandingTokens(random.Random(0), OPTIONS)
    assert policy.choose(replicas, RequestInfo(tokens=1)) is replicas[1]


def test_peak_ewma_weighs_outstanding_by_latency_per_token() -> None:
    clock = FakeClock()
    pool = ReplicaPool(["http://fast:1", "http://slow:1"], clock=clock)
    fast, slow = pool.active()
    for _ in range(5):
        pool.observe_latency(fast, 1.0, work=100, decay_s=10.0)  # 10 ms per token
        pool.observe_latency(slow, 2.0, work=100, decay_s=10.0)  # 20 ms per token
    policy = PeakEwma(random.Random(0), PolicyOptions(ewma_decay_s=10.0, clock=clock))
    assert policy.choose(pool.active(), NO_INFO) is fast  # 0.01 x 1 < 0.02 x 1
    fast.outstanding = 2
    assert policy.choose(pool.active(), NO_INFO) is slow  # 0.01 x 3 > 0.02 x 1
    fast.outstanding = 0
    pool.observe_latency(fast, 5.0, work=100, decay_s=10.0)  # one slow answer: taken at once
    assert policy.choose(pool.active(), NO_INFO) is slow
    clock.now += 30  # then fast answers again: the spike fades over decay_s
    pool.observe_latency(fast, 1.0, work=100, decay_s=10.0)
    pool.observe_latency(slow, 2.0, work=100, decay_s=10.0)
    assert fast.latency_ewma_s == pytest.approx(0.05 * math.exp(-3) + 0.01 * (1 - math.exp(-3)))
    assert policy.choose(pool.active(), NO_INFO) is fast


def test_peak_ewma_costs_a_replica_without_samples_at_the_mean() -> None:
    clock = FakeClock()
    pool = ReplicaPool(["http://a:1", "http://b:1", "http://new:1"], clock=clock)
    a, b, new = pool.active()
    pool.observe_latency(a, 0.1, work=10, decay_s=10.0)  # 0.01
    pool.observe_latency(b, 0.3, work=10, decay_s=10.0)  # 0.03
    policy = PeakEwma(random.Random(0), PolicyOptions(clock=clock))
    assert policy.choose(pool.active(), NO_INFO) is a  # new costs 0.02 x 1
    a.outstanding = 2
    assert policy.choose(pool.active(), NO_INFO) is new  # a: 0.03, b: 0.03, new: 0.02


def test_affinity_takes_keys_that_are_not_valid_unicode() -> None:
    # Issue 30: a session header's undecodable bytes reach the policy as surrogates.
    replicas = _replicas(4)
    policy = Affinity(random.Random(0), OPTIONS)
    for key in ("\udc80\udcff", "a\ud800b", b"\xff\xfe".decode("utf-8", "surrogateescape")):
        first = policy.choose(replicas, RequestInfo(key=key))
        assert policy.choose(replicas, RequestInfo(key=key)) is first


def test_affinity_keeps_a_key_on_one_replica_and_spreads_keys() -> None:
    replicas = _replicas(4)
    policy = Affinity(random.Random(0), OPTIONS)
    homes = {}
    for i in range(400):
        key = f"conversation-{i}"
        picks = {policy.choose(replicas, RequestInfo(key=key)).url for _ in range(3)}
        assert len(picks) == 1
        homes[key] = picks.pop()
    spread = Counter(homes.values())
    assert len(spread) == 4 and min(spread.values()) >= 50, spread
    # A second process (fresh policy, same hash) maps every key the same way.
    other = Affinity(random.Random(9), OPTIONS)
    assert all(other.choose(replicas, RequestInfo(key=k)).url == u for k, u in homes.items())


def test_affinity_spills_to_the_next_replica_past_the_load_bound() -> None:
    replicas = _replicas(4)
    policy = Affinity(random.Random(0), PolicyOptions(affinity=AffinityOptions(load_factor=1.25)))
    home = policy.choose(replicas, RequestInfo(key="hot"))
    home.outstanding = 4  # bound = ceil(1.25 x (4 + 1) / 4) = 2: home is over it
    spill = policy.choose(replicas, RequestInfo(key="hot"))
    assert spill is not home
    assert {policy.choose(replicas, RequestInfo(key="hot")).url for _ in range(20)} == {spill.url}
    home.outstanding = 0
    assert policy.choose(replicas, RequestInfo(key="hot")) is home


def test_affinity_removing_a_replica_moves_only_its_keys() -> None:
    replicas = _replicas(5)
    policy = Affinity(random.Random(0), OPTIONS)
    keys = [f"k{i}" for i in range(500)]
    before = {k: policy.choose(replicas, RequestInfo(key=k)).url for k in keys}
    gone = replicas[2].url
    after = {k: policy.choose(replicas[:2] + replicas[3:], RequestInfo(key=k)).url for k in keys}
    moved = [k for k in keys if before[k] != after[k]]
    assert moved and all(before[k] == gone for k in moved)


def test_affinity_without_a_key_is_least_outstanding() -> None:
    replicas = _replicas(3)
    replicas[0].outstanding, replicas[1].outstanding, replicas[2].outstanding = 2, 0, 1
    assert Affinity(random.Random(0), OPTIONS).choose(replicas, NO_INFO) is replicas[1]

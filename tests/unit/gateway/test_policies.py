"""Policies are pure: statistical checks over seeded draws, no servers."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from gateway.policies import (
    POLICIES,
    LeastOutstandingRequests,
    RandomPolicy,
    RoundRobinPolicy,
    canonical_policy_name,
    make_policy,
)
from gateway.pool import Replica

DRAWS = 10_000


def _replicas(n: int) -> list[Replica]:
    return [Replica(f"http://127.0.0.1:{9000 + i}") for i in range(n)]


@pytest.mark.parametrize("n", [2, 3, 5])
def test_random_is_uniform_within_5_percent(n: int) -> None:
    replicas = _replicas(n)
    policy = RandomPolicy(random.Random(7))
    counts = Counter(policy.choose(replicas).url for _ in range(DRAWS))
    expected = DRAWS / n
    assert set(counts) == {r.url for r in replicas}
    assert all(abs(c - expected) <= 0.05 * expected for c in counts.values()), counts


@pytest.mark.parametrize("n", [1, 3, 7])
def test_round_robin_spreads_evenly(n: int) -> None:
    replicas = _replicas(n)
    policy = RoundRobinPolicy(random.Random(1))
    picks = [policy.choose(replicas).url for _ in range(DRAWS)]
    counts = Counter(picks)
    assert len(counts) == n and max(counts.values()) - min(counts.values()) <= 1
    assert all(picks[i] != picks[i + 1] for i in range(len(picks) - 1)) or n == 1


def test_least_outstanding_always_picks_a_minimum() -> None:
    rng = random.Random(3)
    replicas = _replicas(6)
    policy = LeastOutstandingRequests(random.Random(11))
    for _ in range(DRAWS):
        for r in replicas:
            r.outstanding = rng.choice([0, 1, 2, 3])
        assert policy.choose(replicas).outstanding == min(r.outstanding for r in replicas)


@pytest.mark.parametrize("counts", [[0, 0, 0, 0], [3, 1, 2, 1], [5, 5, 9, 5]])
def test_least_outstanding_spreads_ties_evenly_not_by_list_order(counts: list[int]) -> None:
    replicas = _replicas(4)
    for r, c in zip(replicas, counts, strict=True):
        r.outstanding = c
    policy = LeastOutstandingRequests(random.Random(5))
    picks = Counter(policy.choose(replicas).url for _ in range(DRAWS))
    tied = [r.url for r in replicas if r.outstanding == min(counts)]
    assert sorted(picks) == sorted(tied)
    expected = DRAWS / len(tied)
    assert all(abs(c - expected) <= 0.05 * expected for c in picks.values()), picks


def test_least_outstanding_fills_evenly_under_arrivals_only() -> None:
    replicas = _replicas(3)
    policy = LeastOutstandingRequests(random.Random(0))
    for _ in range(300):
        policy.choose(replicas).outstanding += 1
        counts = [r.outstanding for r in replicas]
        assert max(counts) - min(counts) <= 1
    assert [r.outstanding for r in replicas] == [100, 100, 100]


def test_policies_do_not_change_replica_state() -> None:
    replicas = _replicas(3)
    before = [r.as_json() for r in replicas]
    for name in POLICIES:
        policy = make_policy(name, random.Random(0))
        for _ in range(10):
            policy.choose(replicas)
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

"""Routing policies: each picks one replica from the healthy ones and holds no counts of its own.

The pool owns replica state; a policy only reads it. A policy never sees an empty list (the
caller raises NoHealthyReplica first) and takes its random source as an argument so tests are
exact. New policies are registered by name in POLICIES, the one place the config looks.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Protocol

from gateway.pool import Replica


class Policy(Protocol):
    def choose(self, replicas: Sequence[Replica]) -> Replica: ...


class RandomPolicy:
    """Uniform choice: SageMaker's RANDOM."""

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng

    def choose(self, replicas: Sequence[Replica]) -> Replica:
        return replicas[self._rng.randrange(len(replicas))]


class RoundRobinPolicy:
    """Each replica in turn; a changed list continues the rotation where it is."""

    def __init__(self, rng: random.Random) -> None:
        # Start at a random offset so several gateways do not all begin on the first replica.
        self._next = rng.randrange(1 << 16)

    def choose(self, replicas: Sequence[Replica]) -> Replica:
        replica = replicas[self._next % len(replicas)]
        self._next += 1
        return replica


class LeastOutstandingRequests:
    """Exact minimum of outstanding requests; ties broken at random, never by list order."""

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng

    def choose(self, replicas: Sequence[Replica]) -> Replica:
        least = min(r.outstanding for r in replicas)
        tied = [r for r in replicas if r.outstanding == least]
        return tied[0] if len(tied) == 1 else tied[self._rng.randrange(len(tied))]


POLICIES: dict[str, Callable[[random.Random], Policy]] = {
    "random": RandomPolicy,
    "round_robin": RoundRobinPolicy,
    "least_outstanding_requests": LeastOutstandingRequests,
}


def canonical_policy_name(name: str) -> str:
    """Accept SageMaker's spellings (RANDOM, LEAST_OUTSTANDING_REQUESTS) and dashes."""
    key = name.strip().lower().replace("-", "_")
    if key not in POLICIES:
        raise ValueError(f"unknown strategy {name!r}; expected one of: {', '.join(POLICIES)}")
    return key


def make_policy(name: str, rng: random.Random | None = None) -> Policy:
    return POLICIES[canonical_policy_name(name)](rng or random.Random())

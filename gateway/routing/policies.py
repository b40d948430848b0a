"""The routing policies, registered by name in POLICIES, the one place the config looks; each
picks one replica from the healthy ones and holds no counts of its own (the contract:
gateway/routing/base.py; the prefix-aware two: gateway/routing/prefix_aware.py).

A policy that needs to know about the request (its estimated work in tokens, an affinity key,
its prefix) says so in `needs`; the data path reads the body for it only then
(gateway/datapath/classify.py).
"""

from __future__ import annotations

import bisect
import math
import random
from collections.abc import Callable, Sequence
from typing import ClassVar

from gateway.routing.base import Cost, Policy, least, stable_hash
from gateway.routing.options import PolicyOptions
from gateway.routing.prefix_aware import PrecisePrefix, PrefixAware
from gateway.routing.replica import Replica
from gateway.routing.request import Need, RequestInfo


class RandomPolicy(Policy):
    """Uniform choice: SageMaker's RANDOM."""

    needs: ClassVar[frozenset[Need]] = frozenset()

    def __init__(self, rng: random.Random, options: PolicyOptions) -> None:
        self._rng = rng

    def choose(self, replicas: Sequence[Replica], request: RequestInfo) -> Replica:
        return replicas[self._rng.randrange(len(replicas))]


class RoundRobinPolicy(Policy):
    """Each replica in turn; a changed list continues the rotation where it is."""

    needs: ClassVar[frozenset[Need]] = frozenset()

    def __init__(self, rng: random.Random, options: PolicyOptions) -> None:
        # Start at a random offset so several gateways do not all begin on the first replica.
        self._next = rng.randrange(1 << 16)

    def choose(self, replicas: Sequence[Replica], request: RequestInfo) -> Replica:
        replica = replicas[self._next % len(replicas)]
        self._next += 1
        return replica


class LeastOutstandingRequests(Policy):
    """Exact minimum of this gateway's outstanding requests."""

    needs: ClassVar[frozenset[Need]] = frozenset()

    def __init__(self, rng: random.Random, options: PolicyOptions) -> None:
        self._rng = rng

    def choose(self, replicas: Sequence[Replica], request: RequestInfo) -> Replica:
        return least(replicas, _outstanding, self._rng)

    def cost(self, replicas: Sequence[Replica], request: RequestInfo) -> Cost:
        return _outstanding


def _outstanding(replica: Replica) -> int:
    return replica.busy


class PowerOfTwoChoices(Policy):
    """Least outstanding of two replicas drawn at random (Envoy's and Ray Serve's default):
    nearly as good as the exact minimum, and several gateways do not all herd onto the same
    emptiest replica."""

    needs: ClassVar[frozenset[Need]] = frozenset()

    def __init__(self, rng: random.Random, options: PolicyOptions) -> None:
        self._rng = rng

    def choose(self, replicas: Sequence[Replica], request: RequestInfo) -> Replica:
        n = len(replicas)
        if n == 1:
            return replicas[0]
        i = self._rng.randrange(n)
        j = self._rng.randrange(n - 1)
        a, b = replicas[i], replicas[j + (j >= i)]
        return b if b.busy < a.busy else a  # a is already a random pick


class LeastLoaded(Policy):
    """Minimum of this gateway's outstanding requests plus the requests other gateways have at
    the replica, from its freshest load report (response header or /load poll), so several
    gateway instances in front of the same replicas stay balanced."""

    needs: ClassVar[frozenset[Need]] = frozenset()

    def __init__(self, rng: random.Random, options: PolicyOptions) -> None:
        self._rng = rng
        self._clock = options.clock
        self._max_age_s = options.feedback_max_age_s

    def choose(self, replicas: Sequence[Replica], request: RequestInfo) -> Replica:
        return least(replicas, self.cost(replicas, request), self._rng)

    def cost(self, replicas: Sequence[Replica], request: RequestInfo) -> Cost:
        now, max_age = self._clock(), self._max_age_s
        return lambda r: r.load(now, max_age)


class LeastOutstandingTokens(Policy):
    """Minimum estimated outstanding work: prompt tokens plus max_tokens of every request in
    flight, reduced as streamed tokens are relayed. Fewer requests break ties."""

    needs: ClassVar[frozenset[Need]] = frozenset({"tokens"})

    def __init__(self, rng: random.Random, options: PolicyOptions) -> None:
        self._rng = rng

    def choose(self, replicas: Sequence[Replica], request: RequestInfo) -> Replica:
        return least(replicas, _tokens_then_requests, self._rng)

    def cost(self, replicas: Sequence[Replica], request: RequestInfo) -> Cost:
        return _tokens_then_requests


def _tokens_then_requests(replica: Replica) -> float:
    return replica.outstanding_tokens + replica.busy / 1024


class PeakEwma(Policy):
    """Latency-aware (Finagle/Linkerd): cost = the replica's peak-EWMA latency per unit of work
    x (outstanding + 1). A slow replica's latency rises at once and fades only over
    `ewma_decay_s`, so it gets fewer requests until it speeds up. A replica with no sample yet
    is costed at the mean of the others, so a new replica is neither flooded nor starved."""

    needs: ClassVar[frozenset[Need]] = frozenset({"tokens"})

    def __init__(self, rng: random.Random, options: PolicyOptions) -> None:
        self._rng = rng
        self._clock = options.clock
        self._decay_s = options.ewma_decay_s

    def choose(self, replicas: Sequence[Replica], request: RequestInfo) -> Replica:
        return least(replicas, self.cost(replicas, request), self._rng)

    def cost(self, replicas: Sequence[Replica], request: RequestInfo) -> Cost:
        now = self._clock()
        latency = {r.url: self._decayed(r, now) for r in replicas}
        sampled = [v for v in latency.values() if v > 0]
        default = sum(sampled) / len(sampled) if sampled else 1.0
        return lambda r: (latency[r.url] or default) * (r.busy + 1)

    def _decayed(self, replica: Replica, now: float) -> float:
        return replica.latency_ewma_s * math.exp(-(now - replica.latency_at) / self._decay_s)


class Affinity(Policy):
    """Consistent hashing with bounded loads (Mirrokni, Thorup and Zadimoghaddam 2018): a key
    (session header or prompt prefix) goes to the same replica while that replica holds at
    most `affinity.load_factor` x the mean outstanding; past that, to the next one on the ring.
    Requests without a key go to the least outstanding replica. The hash is stable across
    processes, so every gateway instance maps a key to the same replica."""

    needs: ClassVar[frozenset[Need]] = frozenset({"key"})
    VNODES = 64  # points per replica on the ring: keys spread within a few percent

    def __init__(self, rng: random.Random, options: PolicyOptions) -> None:
        self._rng = rng
        self._factor = options.affinity.load_factor
        self._rings: dict[frozenset[str], tuple[list[int], list[str]]] = {}

    def choose(self, replicas: Sequence[Replica], request: RequestInfo) -> Replica:
        if request.key is None or len(replicas) == 1:
            return least(replicas, _outstanding, self._rng)
        by_url = {r.url: r for r in replicas}
        points, owners = self._ring(by_url)
        total = sum(r.busy for r in replicas)
        bound = math.ceil(self._factor * (total + 1) / len(replicas))
        start = bisect.bisect(points, stable_hash(request.key))
        seen: set[str] = set()
        for k in range(len(owners)):
            url = owners[(start + k) % len(owners)]
            if url in seen:
                continue
            if by_url[url].busy + 1 <= bound:
                return by_url[url]
            seen.add(url)
            if len(seen) == len(by_url):
                break
        return least(replicas, _outstanding, self._rng)  # unreachable: the bound admits one

    def _ring(self, by_url: dict[str, Replica]) -> tuple[list[int], list[str]]:
        key = frozenset(by_url)
        ring = self._rings.get(key)
        if ring is None:
            entries = sorted(
                (stable_hash(f"{url}#{i}"), url) for url in by_url for i in range(self.VNODES)
            )
            ring = ([h for h, _ in entries], [u for _, u in entries])
            if len(self._rings) >= 16:  # replica sets seen lately (health, limits, retries)
                self._rings.clear()
            self._rings[key] = ring
        return ring


POLICIES: dict[str, Callable[[random.Random, PolicyOptions], Policy]] = {
    "random": RandomPolicy,
    "round_robin": RoundRobinPolicy,
    "least_outstanding_requests": LeastOutstandingRequests,
    "power_of_two": PowerOfTwoChoices,
    "least_loaded": LeastLoaded,
    "least_outstanding_tokens": LeastOutstandingTokens,
    "peak_ewma": PeakEwma,
    "affinity": Affinity,
    "prefix_aware": PrefixAware,
    "precise_prefix": PrecisePrefix,
}


def canonical_policy_name(name: str) -> str:
    """Accept SageMaker's spellings (RANDOM, LEAST_OUTSTANDING_REQUESTS) and dashes."""
    key = name.strip().lower().replace("-", "_")
    if key not in POLICIES:
        raise ValueError(f"unknown strategy {name!r}; expected one of: {', '.join(POLICIES)}")
    return key


def make_policy(
    name: str, rng: random.Random | None = None, options: PolicyOptions | None = None
) -> Policy:
    key = canonical_policy_name(name)
    policy = POLICIES[key](rng or random.Random(), options or PolicyOptions())
    policy.name = key
    return policy

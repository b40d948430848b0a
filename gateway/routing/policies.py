"""Routing policies: each picks one replica from the healthy ones and holds no counts of its own.

The pool owns replica state (outstanding requests and tokens, reported load, latency); a policy
only reads it. A policy never sees an empty list (the caller raises NoHealthyReplica first) and
takes its random source as an argument so tests are exact. Ties are broken at random, never by
list order. New policies are registered by name in POLICIES, the one place the config looks.

A policy subclasses Policy: one method, `choose`, and named hooks (`on_dispatch`,
`replicas_changed`, `on_report`) that admission and the control loops call on every policy,
no-ops unless a policy overrides them. A policy that needs to know about the request (its
estimated work in tokens, an affinity key, its prefix) says so in `needs`; the data path reads
the body for it only then (gateway/datapath/classify.py).
"""

from __future__ import annotations

import bisect
import hashlib
import math
import random
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import ClassVar

from gateway.routing.options import PolicyOptions
from gateway.routing.prefix import PrefixIndex
from gateway.routing.replica import Replica
from gateway.routing.request import Need, RequestInfo

Cost = Callable[[Replica], float]


class Policy:
    """A routing policy: `choose` picks one of the candidates for a request. It never gets an
    empty list (the caller raises NoHealthyReplica first), breaks ties at random and changes no
    replica state. The hooks tell it what happened after its decision; each is a no-op here,
    overridden by the policies that learn from it. `needs` names what it reads of the request
    (tokens, key, prefix: filled in by the data path's classify) and of the replicas
    (cache_blocks: their reported cache, polled by gateway/control/cache_blocks.py)."""

    needs: ClassVar[frozenset[Need]] = frozenset()
    name = ""  # its name in POLICIES, set by make_policy

    def choose(self, replicas: Sequence[Replica], request: RequestInfo) -> Replica:
        raise NotImplementedError

    def on_dispatch(self, replica: Replica, request: RequestInfo) -> None:
        """A lease on `replica` was granted for `request`, after `choose` (or a queue's hand-out)
        picked it: the request goes there."""

    def replicas_changed(self, urls: Sequence[str]) -> None:
        """The pool's active replicas are now `urls`: forget what is kept of others."""

    def on_report(self, url: str, hashes: Sequence[int]) -> None:
        """What replica `url` holds in its prefix cache now (for a policy that needs
        cache_blocks)."""

    def cost(self, replicas: Sequence[Replica], request: RequestInfo) -> Cost | None:
        """A least-cost policy's cost of each candidate for this request (lower wins, ties at
        random); None for a policy that does not choose by cost."""
        return None

    def scores(self, replicas: Sequence[Replica], request: RequestInfo) -> dict[str, float] | None:
        """Each candidate's cost, by URL, as this policy sees them now (for explaining a
        decision); None where the policy has no costs."""
        cost = self.cost(replicas, request)
        return None if cost is None else {r.url: float(cost(r)) for r in replicas}


def least(
    replicas: Sequence[Replica], cost: Callable[[Replica], float], rng: random.Random
) -> Replica:
    """A replica of least cost; ties broken uniformly at random."""
    best = math.inf
    tied: list[Replica] = []
    for replica in replicas:
        c = cost(replica)
        if c < best:
            best, tied = c, [replica]
        elif c == best:
            tied.append(replica)
    return tied[0] if len(tied) == 1 else tied[rng.randrange(len(tied))]


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


class PrefixAware(Policy):
    """Cache reuse against load, in one cost in tokens of prefill: for each replica, the prompt
    tokens it would have to prefill (those past the longest run of the prompt's blocks it is
    known to hold) plus what its load costs this request; the cheapest wins, ties at random.
    (The prompt's length is the same everywhere, so the cost computed is `load cost - cached
    tokens`.) A replica's load is its outstanding requests (with those of other gateways while
    its report is fresh). Where its capacity is known (its `max_concurrency`, or the `capacity`
    it reports), a request that finds a free slot costs `tokens_per_running` (another sequence
    in the batch) and one that would wait for a slot `tokens_per_queued`; where it is not, every
    request costs `tokens_per_outstanding`.

    The guard against imbalance is relative, so it behaves alike at 2 and at 200 replicas: a
    replica gets credit for its cache only while it has a free slot or holds less than
    `balance_factor` x the fleet's mean load (rounded up, counting this request), and never at
    `concurrency_threshold` or above. The index learns from the gateway's own dispatches
    (`on_dispatch`, once a lease is granted: a choice that is never sent teaches nothing; bounded,
    LRU; replicas that leave are dropped). A request with a session header and no prompt the
    gateway can read goes where its session went last, within the same guard. SageMaker's
    PREFIX_AWARE routing names the same two knobs (`prefix_length`, `concurrency_threshold`)."""

    needs: ClassVar[frozenset[Need]] = frozenset({"prefix"})
    MAX_SESSIONS = 65_536

    def __init__(self, rng: random.Random, options: PolicyOptions) -> None:
        self._rng = rng
        self._options = options.prefix
        self._max_age_s = options.feedback_max_age_s
        self._clock = options.clock
        self.index = PrefixIndex(self._options.max_entries)
        self._sessions: OrderedDict[str, tuple[str, int]] = OrderedDict()  # url, prompt tokens

    def choose(self, replicas: Sequence[Replica], request: RequestInfo) -> Replica:
        return self._least(replicas, self.cost(replicas, request), request)

    def cost(self, replicas: Sequence[Replica], request: RequestInfo) -> Cost:
        o = self._options
        now = self._clock()
        matched = self.matched(request)
        loads = {r.url: r.load(now, self._max_age_s) for r in replicas}
        bound = math.ceil(o.balance_factor * (sum(loads.values()) + 1) / len(replicas))
        cap = o.concurrency_threshold

        def cost(r: Replica) -> float:
            load, slots = loads[r.url], self.capacity(r, now)
            if slots is None:
                load_cost = o.tokens_per_outstanding * load
                free = False
            else:
                queued = max(0, load + 1 - slots)
                load_cost = o.tokens_per_running * min(load, slots) + o.tokens_per_queued * queued
                free = queued == 0
            hit = matched.get(r.url, 0)
            if not (free or load + 1 <= bound) or (cap is not None and load >= cap):
                hit = 0
            return load_cost - hit

        return cost

    def capacity(self, replica: Replica, now: float) -> int | None:
        """Requests the replica runs at once: its configured limit, else its fresh report."""
        if replica.max_concurrency:
            return replica.max_concurrency
        report = replica.reported or {}
        fresh = now - replica.reported_at <= self._max_age_s
        slots = report.get("capacity", 0) if fresh else 0
        return int(slots) if slots >= 1 else None

    def _least(
        self, replicas: Sequence[Replica], cost: Callable[[Replica], float], request: RequestInfo
    ) -> Replica:
        return least(replicas, cost, self._rng)

    def matched(self, request: RequestInfo) -> dict[str, int]:
        """Prompt tokens each replica is thought to hold already."""
        blocks = self.index.matched_blocks(request.prefix)
        matched = {url: n * self._options.block_size for url, n in blocks.items()}
        if not request.prefix and request.key is not None:
            url, tokens = self._sessions.get(request.key, (None, 0))
            if url is not None:
                matched[url] = tokens  # its last prompt, as far as the gateway could read it
        return matched

    def on_dispatch(self, replica: Replica, request: RequestInfo) -> None:
        self.index.insert(replica.url, request.prefix)
        if request.key is not None:
            last = self._sessions.get(request.key, ("", 0))[1]
            self._sessions[request.key] = (replica.url, max(request.prompt_tokens, last, 1))
            self._sessions.move_to_end(request.key)
            if len(self._sessions) > self.MAX_SESSIONS:
                self._sessions.popitem(last=False)

    def replicas_changed(self, urls: Sequence[str]) -> None:
        self.index.forget_all_but(urls)
        kept = set(urls)
        for key in [k for k, (url, _) in self._sessions.items() if url not in kept]:
            del self._sessions[key]


class PrecisePrefix(PrefixAware):
    """PrefixAware on what the replicas hold, not on what the gateway sent: the index is each
    replica's own `GET /cache/blocks` report, replaced at every poll
    (gateway/control/cache_blocks.py), so evictions and restarts show within one poll interval.
    Ties go to the replica whose
    hash with the prompt's first block is highest (rendezvous hashing), so a new prefix keeps to
    one replica until the replicas report it, and gateways that see the same reports and loads
    make the same choice."""

    needs: ClassVar[frozenset[Need]] = frozenset({"prefix", "cache_blocks"})

    def on_dispatch(self, replica: Replica, request: RequestInfo) -> None:
        if request.key is not None:  # sessions are remembered; blocks come from the replicas
            super().on_dispatch(
                replica, RequestInfo(key=request.key, prompt_tokens=request.prompt_tokens)
            )

    def on_report(self, url: str, hashes: Sequence[int]) -> None:
        self.index.replace(url, hashes)

    def _least(
        self, replicas: Sequence[Replica], cost: Callable[[Replica], float], request: RequestInfo
    ) -> Replica:
        seed = str(request.prefix[0] if request.prefix else request.key or "")
        return min(replicas, key=lambda r: (cost(r), -stable_hash(f"{seed}|{r.url}")))


def stable_hash(text: str) -> int:
    """64 bits that every process agrees on (Python's hash() is salted per process). Any text
    hashes, lone surrogates included: a header's undecodable bytes reach here as surrogates."""
    data = text.encode("utf-8", "surrogatepass")
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


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

"""The policy contract: Policy (one method, `choose`, and named hooks that admission and the
control loops call on every policy, no-ops unless a policy overrides them), `least` (the
least-cost pick with a random tie-break that most policies use) and `stable_hash`.

The pool owns replica state (outstanding requests and tokens, reported load, latency); a policy
only reads it. A policy never sees an empty list (the caller raises NoHealthyReplica first) and
takes its random source as an argument so tests are exact. Ties are broken at random, never by
list order.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import ClassVar

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

    def on_cache(
        self,
        url: str,
        held: Mapping[int, float],
        dropped: Collection[int] = (),
        *,
        replace: bool = False,
    ) -> None:
        """What replica `url` holds in its prefix cache (for a policy that needs cache_blocks):
        it holds the blocks `held` (each with its weight: 1 on the GPU, less in a slower tier)
        and no longer holds `dropped`; with `replace`, `held` is all it holds."""

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


def stable_hash(text: str) -> int:
    """64 bits that every process agrees on (Python's hash() is salted per process). Any text
    hashes, lone surrogates included: a header's undecodable bytes reach here as surrogates."""
    data = text.encode("utf-8", "surrogatepass")
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")

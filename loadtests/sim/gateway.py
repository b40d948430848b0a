"""A simulated gateway for loadtests/sim/model.py: the gateway's own routing code on the
simulated clock. It holds a real `gateway.pool.replicas.ReplicaPool` (the one owner of
outstanding counts and work, load reports and latency samples) and a policy made by
`POLICIES[name](rng, options)`, as a live gateway does, and estimates a request's work with
gateway/datapath/classify.py from its JSON body.
So any registered policy is simulated, one added later included, with no change to the model.

The central queue (`central_queue`) is least outstanding requests over the replicas with a free
slot, as loadtests/bench.py runs it live; the FIFO of requests waiting for a slot is the model's.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

from multidict import CIMultiDict, CIMultiDictProxy

from gateway.datapath.classify import describe
from gateway.pool.replicas import ReplicaPool
from gateway.routing.options import AffinityOptions, PolicyOptions
from gateway.routing.policies import POLICIES
from gateway.routing.replica import Replica
from gateway.routing.request import NO_INFO, RequestInfo

CENTRAL_QUEUE = "central_queue"
CENTRAL_QUEUE_POLICY = "least_outstanding_requests"  # what the queue hands a free slot by
_NO_HEADERS = CIMultiDictProxy(CIMultiDict[str]())
_AFFINITY = AffinityOptions()


def front_ends() -> tuple[str, ...]:
    """Every policy registered now, and the central queue."""
    return (*POLICIES, CENTRAL_QUEUE)


class SimGateway:
    """One gateway: its own pool and policy. With `slots` (the central queue) a replica takes
    at most that many of this gateway's requests and `route` finds none while all are full."""

    def __init__(
        self,
        policy: str,
        urls: Sequence[str],
        rng: random.Random,
        clock: Callable[[], float],
        slots: int | None,
    ) -> None:
        self.options = PolicyOptions(clock=clock)
        self.pool = ReplicaPool(urls, clock=clock)
        self.policy = POLICIES[CENTRAL_QUEUE_POLICY if policy == CENTRAL_QUEUE else policy](
            rng, self.options
        )
        self.slots = slots

    def describe(self, body: bytes) -> RequestInfo:
        """What the policy may know of a request with this JSON body
        (gateway/datapath/classify.py)."""
        needs = self.policy.needs
        return describe(needs, _NO_HEADERS, body, _AFFINITY) if needs else NO_INFO

    def route(self, request: RequestInfo) -> Replica | None:
        """The replica chosen for the request, counted in the pool; None while it must wait."""
        candidates = self.pool.available()
        if self.slots is not None:
            candidates = [r for r in candidates if r.outstanding < self.slots]
            if not candidates:
                return None
        replica = self.policy.choose(candidates, request)
        self.pool.acquire(replica, request.tokens)
        self.policy.on_dispatch(replica, request)  # as admission does with a lease
        return replica

"""A discrete-event model of the routing benchmark: the same workload, the same replicas
(continuous batching with the 7B/A10G step profile) and the gateway's own routing code, run by
simulated gateways (loadtests/sim/gateway.py: a real ReplicaPool and a policy from POLICIES, so
every registered policy is simulated with no change here). What this module models itself:

- the replicas, step by step as replica/batching/continuous.py runs them: at every step
  waiting sequences join (up to `max_num_seqs`) and are prefilled while the running ones decode
  one token; a sequence of n tokens finishes n steps after it joined. Step time = prefill (base
  + per prompt token, only when someone joins) + decode (base + per running sequence);
- the central queue's FIFO at each gateway (`central_queue`, as loadtests/bench.py runs it live: a
  replica takes at most `max_num_seqs / gateways` of a gateway's requests);
- the network: none. Load reports reach every gateway the instant a replica's count changes
  (live ones come with responses and a 0.5 s poll), and a streamed token is relayed the step
  it is made.

Requests are measured as the live report measures them: those that ended in the window after
the warm-up. `python -m loadtests.simulate` prints its table for any scenarios and policies.
"""

from __future__ import annotations

import heapq
import itertools
import json
import math
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from gateway.routing.replica import Replica
from gateway.routing.request import NO_INFO, RequestInfo
from loadtests.analysis import stats
from loadtests.load.scenarios import (
    INSTANCE_CONCURRENCY,
    saturation_users,
)
from loadtests.load.workload import Workload, draw, user_rng
from loadtests.sim.gateway import CENTRAL_QUEUE, SimGateway


@dataclass(frozen=True)
class Profile:
    """The generation part of replica/engines/profiles/a10g-7b.yaml."""

    prefill_base_s: float = 0.010
    prefill_s_per_token: float = 0.00027
    decode_base_s: float = 0.028
    decode_per_seq_s: float = 0.0005

    def step_s(self, prefill_tokens: int, joining: int, decoding: int) -> float:
        prefill = self.prefill_base_s + self.prefill_s_per_token * prefill_tokens
        decode = self.decode_base_s + self.decode_per_seq_s * decoding
        return (prefill if joining else 0.0) + (decode if decoding else 0.0)


@dataclass(eq=False)
class Request:
    user: int
    prompt_tokens: int
    output_tokens: int
    stream: bool
    sent_s: float
    gateway: int = 0  # which gateway routes it
    body: bytes = b""  # the JSON the client sends; a policy's work estimate reads it
    info: RequestInfo = NO_INFO  # what the gateway's policy knows of it
    replica: int = -1  # the replica that served it
    lease: Replica | None = None  # the gateway's pool entry counting it while outstanding
    remaining: int = 0  # its work estimate still counted at the gateway
    dispatched_s: float = math.nan
    left: int = 0  # tokens still to generate
    first_token_s: float = math.nan
    answered_s: float = math.nan


@dataclass(eq=False)
class SimReplica:
    """The replica process: its queue and running batch (what the gateway cannot see)."""

    index: int
    url: str
    slowdown: float = 1.0  # step times are multiplied by this (2.0 = half speed)
    queue: deque[Request] = field(default_factory=deque)
    running: list[Request] = field(default_factory=list)
    busy: bool = False
    inflight: int = 0  # requests here from every gateway, as its load report counts them


@dataclass(frozen=True)
class Result:
    policy: str
    users: int
    instances: int
    latencies_s: list[float]
    ttfts_s: list[float]
    end_times_s: list[float]  # simulated time each measured request ended
    warmup_s: float
    measured_s: float

    @property
    def p50_s(self) -> float:
        return stats.percentile(self.latencies_s, 50)

    @property
    def p99_s(self) -> float:
        return stats.percentile(self.latencies_s, 99)

    @property
    def per_instance_per_min(self) -> float:
        return len(self.latencies_s) / self.measured_s * 60 / self.instances

    def blocks(self, block_s: float) -> list[stats.Block]:
        n = max(1, round(self.measured_s / block_s))
        return stats.blocks_of(
            self.end_times_s, self.latencies_s, self.warmup_s, self.measured_s, n
        )


class Simulation:
    def __init__(
        self,
        policy: str,
        instances: int,
        workload: Workload,
        *,
        max_num_seqs: int = INSTANCE_CONCURRENCY,
        profile: Profile = Profile(),
        slowdowns: tuple[float, ...] = (),
        gateways: int = 1,
        seed: int = 0,
    ) -> None:
        self.policy = policy
        self.replicas = [
            SimReplica(i, f"http://sim-replica-{i}", slowdowns[i] if i < len(slowdowns) else 1.0)
            for i in range(instances)
        ]
        self._by_url = {r.url: r for r in self.replicas}
        slots = max(1, max_num_seqs // gateways) if policy == CENTRAL_QUEUE else None
        urls = [r.url for r in self.replicas]
        self.gateways = [
            SimGateway(policy, urls, random.Random(f"gateway:{seed}:{g}"), self.clock, slots)
            for g in range(gateways)
        ]
        self._waiting: list[deque[Request]] = [deque() for _ in range(gateways)]
        self.workload = workload
        self.max_num_seqs = max_num_seqs
        self.profile = profile
        self.now = 0.0
        self._events: list[tuple[float, int, Callable[[], None]]] = []
        self._order = itertools.count()
        self.done: list[Request] = []
        self.on_done: Callable[[Request], None] = lambda request: None

    def clock(self) -> float:
        return self.now

    # -- the event loop -------------------------------------------------------------------
    def at(self, when: float, action: Callable[[], None]) -> None:
        heapq.heappush(self._events, (when, next(self._order), action))

    def run_until(self, end_s: float) -> None:
        while self._events and self._events[0][0] <= end_s:
            self.now, _, action = heapq.heappop(self._events)
            action()

    # -- the gateways ---------------------------------------------------------------------
    def submit(self, request: Request) -> None:
        gateway = self.gateways[request.gateway]
        request.info = gateway.describe(request.body)
        self._waiting[request.gateway].append(request)
        self._admit(request.gateway)

    def _admit(self, g: int) -> None:
        """Dispatch gateway g's waiting requests in order while its policy finds a replica."""
        waiting = self._waiting[g]
        while waiting:
            replica = self.gateways[g].route(waiting[0].info)
            if replica is None:
                return
            self._dispatch(replica, waiting.popleft())

    def _dispatch(self, lease: Replica, request: Request) -> None:
        replica = self._by_url[lease.url]
        request.lease, request.replica = lease, replica.index
        request.remaining, request.dispatched_s = request.info.tokens, self.now
        replica.inflight += 1
        self._report(replica)
        replica.queue.append(request)
        if not replica.busy:
            self._step(replica)

    def _relayed_token(self, request: Request) -> None:
        """The proxy lowers a stream's counted work per event relayed, never below 1 token."""
        if request.stream and request.remaining > 1 and request.lease is not None:
            request.remaining -= 1
            self.gateways[request.gateway].pool.progress(request.lease, 1)

    def _answered(self, replica: SimReplica, request: Request) -> None:
        gateway, lease = self.gateways[request.gateway], request.lease
        assert lease is not None
        gateway.pool.release(lease, outcome="served", tokens=request.remaining)
        latency = self.now - request.dispatched_s
        gateway.pool.observe_latency(
            lease, latency, request.info.tokens, gateway.options.ewma_decay_s
        )
        request.lease = None
        replica.inflight -= 1
        self._report(replica)
        request.answered_s = self.now
        self.done.append(request)
        self.on_done(request)
        self._admit(request.gateway)

    def _report(self, replica: SimReplica) -> None:
        """Every gateway hears the replica's new load at once (an idealised X-Replica-Load)."""
        report = {
            "queued": len(replica.queue),
            "running": len(replica.running),
            "capacity": self.max_num_seqs,
            "inflight": replica.inflight,
        }
        for gateway in self.gateways:
            entry = gateway.pool.get(replica.url)
            assert entry is not None
            gateway.pool.report(entry, dict(report), ours=entry.outstanding)

    # -- a replica ------------------------------------------------------------------------
    def _step(self, replica: SimReplica) -> None:
        joining: list[Request] = []
        while replica.queue and len(replica.running) + len(joining) < self.max_num_seqs:
            joining.append(replica.queue.popleft())
        decoding = list(replica.running)
        if not joining and not decoding:
            replica.busy = False
            return
        replica.busy = True
        tokens = sum(r.prompt_tokens for r in joining)
        duration = self.profile.step_s(tokens, len(joining), len(decoding)) * replica.slowdown

        def finish() -> None:
            for request in joining:
                request.first_token_s = self.now
                request.left = request.output_tokens - 1
            for request in decoding:
                request.left -= 1
            for request in [*joining, *decoding]:
                self._relayed_token(request)
            replica.running = [r for r in [*decoding, *joining] if r.left > 0]
            for request in [*decoding, *joining]:
                if request.left <= 0:
                    self._answered(replica, request)
            self._step(replica)

        self.at(self.now + duration, finish)


def _request(
    workload: Workload, rng: random.Random, user: int, now: float, gateway: int = 0
) -> Request:
    drawn = draw(workload, rng)
    prompt = len(drawn.prompt.encode())
    body = drawn.body(workload.model, workload.seed)
    return Request(
        user, prompt, drawn.max_tokens, drawn.stream, now, gateway, json.dumps(body).encode()
    )


def closed_loop(
    policy: str,
    users: int,
    instances: int,
    workload: Workload,
    *,
    warmup_s: float,
    duration_s: float,
    slowdowns: tuple[float, ...] = (),
    gateways: int = 1,
) -> Result:
    """Each user sends its next request as soon as the last is answered (think time 0); users
    are split evenly among the gateways."""
    sim = Simulation(
        policy, instances, workload, slowdowns=slowdowns, gateways=gateways, seed=workload.seed
    )
    rngs = [user_rng(workload, u) for u in range(users)]

    def next_from(user: int) -> None:
        sim.submit(_request(workload, rngs[user], user, sim.now, user % gateways))

    sim.on_done = lambda request: next_from(request.user)
    for user in range(users):
        sim.at(0.0, lambda user=user: next_from(user))  # type: ignore[misc]
    sim.run_until(warmup_s + duration_s)
    return _measure(sim, policy, users, instances, warmup_s, duration_s)


def open_loop(
    policy: str,
    rate: float,
    instances: int,
    workload: Workload,
    *,
    warmup_s: float,
    duration_s: float,
    slowdowns: tuple[float, ...] = (),
    gateways: int = 1,
) -> Result:
    """Poisson arrivals at `rate` requests/s in total, each to a gateway drawn at random."""
    sim = Simulation(
        policy, instances, workload, slowdowns=slowdowns, gateways=gateways, seed=workload.seed
    )
    arrivals = random.Random(f"arrivals:{workload.seed}")
    draws = user_rng(workload, 0)
    pick = random.Random(f"hosts:{workload.seed}")

    def arrive() -> None:
        sim.submit(_request(workload, draws, 0, sim.now, pick.randrange(gateways)))
        sim.at(sim.now + arrivals.expovariate(rate), arrive)

    sim.at(arrivals.expovariate(rate), arrive)
    sim.run_until(warmup_s + duration_s)
    return _measure(sim, policy, 0, instances, warmup_s, duration_s)


def _measure(
    sim: Simulation, policy: str, users: int, instances: int, warmup_s: float, duration_s: float
) -> Result:
    """As the live report does: requests that ended in the window after the warm-up."""
    end = warmup_s + duration_s
    measured = [r for r in sim.done if warmup_s <= r.answered_s < end]
    return Result(
        policy,
        users,
        instances,
        [r.answered_s - r.sent_s for r in measured],
        [r.first_token_s - r.sent_s for r in measured],
        [r.answered_s for r in measured],
        warmup_s,
        duration_s,
    )


def run(
    policy: str,
    users: int,
    instances: int,
    workload: Workload,
    *,
    rate: float | None = None,
    warmup_s: float,
    duration_s: float,
    slowdowns: tuple[float, ...] = (),
    gateways: int = 1,
) -> Result:
    """Closed loop with `users` users, or open loop at `rate` requests/s when it is given."""
    if rate is not None:
        return open_loop(
            policy, rate, instances, workload, warmup_s=warmup_s, duration_s=duration_s,
            slowdowns=slowdowns, gateways=gateways,
        )  # fmt: skip
    return closed_loop(
        policy, users, instances, workload, warmup_s=warmup_s, duration_s=duration_s,
        slowdowns=slowdowns, gateways=gateways,
    )  # fmt: skip


def capacity_rps(
    instances: int,
    workload: Workload,
    *,
    slowdowns: tuple[float, ...] = (),
    warmup_s: float = 30.0,
    duration_s: float = 600.0,
) -> float:
    """Requests/s the modelled replicas complete when every slot is always full: closed-loop
    users, `SATURATION_USERS_PER_SLOT` per slot, through least outstanding requests."""
    result = closed_loop(
        "least_outstanding_requests",
        saturation_users(instances),
        instances,
        workload,
        warmup_s=warmup_s,
        duration_s=duration_s,
        slowdowns=slowdowns,
    )
    return len(result.latencies_s) / result.measured_s

"""A discrete-event simulation of the routing benchmark: the same workload, the same replicas
(continuous batching with the 7B/A10G step profile), each routing policy, and the ideal: one
central queue at the gateway that hands a request to the first replica with a free slot.

It shows how close live results come to what the policy could do with zero overhead and exact
timing, and how far every policy is from the central-queue bound. A replica is modelled step
by step as replica/batching/continuous.py runs it: at every step waiting sequences join (up to
`max_num_seqs`) and are prefilled while the running ones decode one token; a sequence of n
tokens finishes n steps after it joined. Step time = prefill (base + per prompt token, only
when someone joins) + decode (base + per running sequence), from the profile.

    python -m loadtests.simulate --scenarios 20/5,80/20 --seconds 600
"""

from __future__ import annotations

import argparse
import functools
import heapq
import itertools
import math
import random
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from loadtests.stats import percentile
from loadtests.workload import Workload, draw, user_rng

CENTRAL_QUEUE = "central_queue"
POLICIES = (
    "random",
    "round_robin",
    "least_outstanding_requests",
    "power_of_two",
    "least_loaded",
    "least_outstanding_tokens",
    CENTRAL_QUEUE,
)


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
    gateway: int = 0  # which gateway instance routes it
    estimate: int = 0  # the gateway's work estimate still counted (least_outstanding_tokens)
    left: int = 0  # tokens still to generate
    first_token_s: float = math.nan
    answered_s: float = math.nan


@dataclass(eq=False)
class SimReplica:
    index: int
    slowdown: float = 1.0  # step times are multiplied by this (2.0 = half speed)
    queue: deque[Request] = field(default_factory=deque)
    running: list[Request] = field(default_factory=list)
    busy: bool = False
    outstanding: int = 0  # dispatched, not yet answered, over all gateways
    by_gateway: list[int] = field(default_factory=list)  # what each gateway counts itself
    tokens_by_gateway: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class Result:
    policy: str
    users: int
    instances: int
    latencies_s: list[float]
    ttfts_s: list[float]
    measured_s: float

    @property
    def p50_s(self) -> float:
        return percentile(self.latencies_s, 50)

    @property
    def p99_s(self) -> float:
        return percentile(self.latencies_s, 99)

    @property
    def per_instance_per_min(self) -> float:
        return len(self.latencies_s) / self.measured_s * 60 / self.instances


class Simulation:
    def __init__(
        self,
        policy: str,
        instances: int,
        workload: Workload,
        *,
        max_num_seqs: int = 4,
        profile: Profile = Profile(),
        slowdowns: tuple[float, ...] = (),
        gateways: int = 1,
        seed: int = 0,
    ) -> None:
        self.policy = policy
        self.gateways = gateways
        self.replicas = [
            SimReplica(
                i,
                slowdowns[i] if i < len(slowdowns) else 1.0,
                by_gateway=[0] * gateways,
                tokens_by_gateway=[0] * gateways,
            )
            for i in range(instances)
        ]
        self.workload = workload
        self.max_num_seqs = max_num_seqs
        self.profile = profile
        self.rng = random.Random(seed)
        self.now = 0.0
        self._events: list[tuple[float, int, Callable[[], None]]] = []
        self._order = itertools.count()
        self._turn = self.rng.randrange(1 << 16)
        self._waiting: deque[Request] = deque()  # the central queue
        self.done: list[Request] = []
        self.on_done: Callable[[Request], None] = lambda request: None

    # -- the event loop -------------------------------------------------------------------
    def at(self, when: float, action: Callable[[], None]) -> None:
        heapq.heappush(self._events, (when, next(self._order), action))

    def run_until(self, end_s: float) -> None:
        while self._events and self._events[0][0] <= end_s:
            self.now, _, action = heapq.heappop(self._events)
            action()

    # -- the gateway ------------------------------------------------------------------------
    def submit(self, request: Request) -> None:
        if self.policy == CENTRAL_QUEUE:
            self._waiting.append(request)
            self._dispatch_waiting()
            return
        self._dispatch(self._choose(request), request)

    def _dispatch_waiting(self) -> None:
        while self._waiting:
            free = [r for r in self.replicas if r.outstanding < self.max_num_seqs]
            if not free:
                return
            least = min(r.outstanding for r in free)
            tied = [r for r in free if r.outstanding == least]
            self._dispatch(self.rng.choice(tied), self._waiting.popleft())

    def _choose(self, request: Request) -> SimReplica:
        """Each gateway sees only its own counts; `least_loaded` sees every gateway's (as
        if load reports were instant), so with one gateway it is least_outstanding_requests."""
        replicas, rng, g = self.replicas, self.rng, request.gateway
        if self.policy == "random":
            return rng.choice(replicas)
        if self.policy == "round_robin":
            self._turn += 1
            return replicas[self._turn % len(replicas)]
        if self.policy == "power_of_two" and len(replicas) > 1:
            a, b = rng.sample(replicas, 2)
            return b if b.by_gateway[g] < a.by_gateway[g] else a
        cost: Callable[[SimReplica], float]
        if self.policy == "least_outstanding_tokens":
            cost = lambda r: r.tokens_by_gateway[g] + r.by_gateway[g] / 1024  # noqa: E731
        elif self.policy == "least_loaded":
            cost = lambda r: r.outstanding  # noqa: E731
        else:
            cost = lambda r: r.by_gateway[g]  # noqa: E731
        least = min(cost(r) for r in replicas)
        return rng.choice([r for r in replicas if cost(r) == least])

    def _dispatch(self, replica: SimReplica, request: Request) -> None:
        request.estimate = math.ceil(request.prompt_tokens / 4) + request.output_tokens
        replica.outstanding += 1
        replica.by_gateway[request.gateway] += 1
        replica.tokens_by_gateway[request.gateway] += request.estimate
        replica.queue.append(request)
        if not replica.busy:
            self._step(replica)

    def _answered(self, replica: SimReplica, request: Request) -> None:
        replica.outstanding -= 1
        replica.by_gateway[request.gateway] -= 1
        replica.tokens_by_gateway[request.gateway] -= request.estimate
        request.answered_s = self.now
        self.done.append(request)
        self.on_done(request)
        if self.policy == CENTRAL_QUEUE:
            self._dispatch_waiting()

    # -- a replica -------------------------------------------------------------------------
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
                if request.stream and request.estimate > 1:  # the proxy counts relayed events
                    request.estimate -= 1
                    replica.tokens_by_gateway[request.gateway] -= 1
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
    return Request(user, prompt, drawn.max_tokens, drawn.stream, now, gateway)


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
    """As the live report does: requests sent in the window, after the warm-up."""
    measured = [r for r in sim.done if r.sent_s >= warmup_s]
    return Result(
        policy,
        users,
        instances,
        [r.answered_s - r.sent_s for r in measured],
        [r.first_token_s - r.sent_s for r in measured],
        duration_s,
    )


def results(
    scenarios: tuple[tuple[int, int], ...],
    policies: tuple[str, ...],
    workload: Workload,
    *,
    warmup_s: float,
    duration_s: float,
    utilization: float | None = None,
    capacity_rps: float = 0.0,
    slowdowns: tuple[float, ...] = (),
    gateways: int = 1,
) -> Iterator[Result]:
    for users, instances in scenarios:
        for policy in policies:
            run: Callable[..., Result]
            if utilization:
                run = functools.partial(open_loop, policy, utilization * capacity_rps * instances)
            else:
                run = functools.partial(closed_loop, policy, users)
            yield run(
                instances,
                workload,
                warmup_s=warmup_s,
                duration_s=duration_s,
                slowdowns=slowdowns,
                gateways=gateways,
            )


def main(argv: list[str] | None = None) -> None:
    from loadtests.bench import SAGEMAKER_SCENARIOS, nominal_capacity_rps, parse_scenarios

    p = argparse.ArgumentParser(prog="python -m loadtests.simulate", description=__doc__)
    p.add_argument("--scenarios", help="users/instances list (default: the SageMaker five)")
    p.add_argument("--policies", default=",".join(POLICIES))
    p.add_argument("--seconds", type=float, default=600.0, help="simulated seconds measured")
    p.add_argument("--warmup", type=float, default=30.0)
    p.add_argument("--output-sigma", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--slow", type=float, default=1.0, help="replica 0 step-time factor (2 = half)")
    p.add_argument("--open-loop", dest="utilization", type=float, help="Poisson, share of capacity")
    p.add_argument("--gateways", type=int, default=1, help="gateways, each counting its own")
    args = p.parse_args(argv)
    workload = Workload(seed=args.seed, output_sigma=args.output_sigma)
    scenarios = parse_scenarios(args.scenarios) if args.scenarios else SAGEMAKER_SCENARIOS
    print("| users / instances | policy | P50 (s) | P99 (s) | P99 TTFT (s) | req/min/instance |")
    print("|---|---|---|---|---|---|")
    for r in results(
        scenarios,
        tuple(args.policies.split(",")),
        workload,
        warmup_s=args.warmup,
        duration_s=args.seconds,
        utilization=args.utilization,
        capacity_rps=nominal_capacity_rps(workload),
        slowdowns=(args.slow,),
        gateways=args.gateways,
    ):
        print(
            f"| {r.users}/{r.instances} | {r.policy} | {r.p50_s:.2f} | {r.p99_s:.2f} | "
            f"{percentile(r.ttfts_s, 99):.2f} | {r.per_instance_per_min:.1f} |"
        )


if __name__ == "__main__":
    main()

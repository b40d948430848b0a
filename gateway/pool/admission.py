"""Admission: which replica a request may be dispatched to now, or how long it must wait, and
the lease (gateway/pool/lease.py) that brackets every dispatch from acquisition to release.

`async with admission.lease(request, tried=...) as lease:` counts the request on `lease.replica`
and, on exit, releases it and records the outcome once: the pool's counts and failure streak,
outlier detection and the latency sample (`peak_ewma`), then tells the `lease_closed`
subscribers (the request metrics). The proxy and the jobs scheduler both dispatch through a
lease, so neither repeats the accounting.

With no slot limit (gateway/pool/slots.py) the policy chooses over the available replicas.
With one, a request that finds no free slot waits at the gateway. Without flow control that is
one FIFO queue (`limits.max_queue`, `limits.queue_timeout_s`); with it, the queue's order is
gateway/flow/queue.py's (strict classes, fairness between tenants, FIFO within a tenant, jobs
last), bounded by `flow_control.max_queued` and `queue_ttl_s`. A request the queue lets go gets
a fast 429 whose Retry-After comes from the rate at which requests are completing now, and
whose X-Infergate-Dropped-Reason says why (queue-full, evicted, ttl-expired).

Slots are handed over, not announced: whenever capacity may have grown (a release, a replica
added or turned healthy, an ejection running out, limits raised by a reload), `wake` walks the
queue in order and acquires a replica *for* each waiter that may use a free one, skipping those
that may not (a retry that already tried it, a job at its cap). So no wake-up is ever lost, and
the invariant holds between events: no request waits while a replica it may use has a free
slot. The walk and the acquisition stay in this one module because they keep that invariant
together.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator, Callable, Collection, Mapping, Sequence
from contextlib import AbstractContextManager, asynccontextmanager, nullcontext
from dataclasses import dataclass, field, replace

from gateway.errors import NoHealthyReplica, Overloaded, clipped
from gateway.flow.queue import DEFAULT_TICKET, JOBS, Entry, FlowQueue, Ticket
from gateway.flow.service import LocalService, Service
from gateway.pool import outlier
from gateway.pool.lease import DrainRate, Lease, outcome_of
from gateway.pool.replicas import ReplicaPool, publish_totals
from gateway.pool.rules import Rules
from gateway.pool.slots import reserved_from, slot_limit
from gateway.routing.replica import Replica
from gateway.routing.request import NO_INFO, Decision, RequestInfo

Scores = Mapping[str, float] | None  # each candidate's cost, by URL (explain)

SHARED_POLL_S = 0.002
DROPPED_HEADER = "X-Infergate-Dropped-Reason"  # why the gateway queue let a request go


class NoUntriedReplica(Exception):
    """Every available replica was already tried by this request."""


Excluded = Callable[[Replica], bool]  # replicas a request may not use now (a job at its cap)


@dataclass(eq=False)
class _Waiter:
    request: RequestInfo
    tried: Collection[Replica]
    future: asyncio.Future[Replica] = field(repr=False)
    since: float = 0.0  # loop time it joined the queue
    excluded: Excluded | None = None

    def usable(self, free: Sequence[Replica]) -> Sequence[Replica]:
        return _usable(free, self.tried, self.excluded)


def _usable(
    free: Sequence[Replica], tried: Collection[Replica], excluded: Excluded | None
) -> Sequence[Replica]:
    if tried:
        free = [r for r in free if r not in tried]
    if excluded is not None:
        free = [r for r in free if not excluded(r)]
    return free


Dequeued = Callable[[Ticket, float, str], None]  # ticket, seconds queued, how it left


class Admission:
    def __init__(
        self,
        pool: ReplicaPool,
        clock: Callable[[], float] = time.monotonic,
        service: Service | None = None,
    ) -> None:
        self.pool = pool
        self._rules: Rules | None = None
        self._clock = clock
        # Tenants' service lately (fairness: tokens): this process's, or every worker's.
        self.service: Service = service or LocalService(60.0, clock)
        self._queue: FlowQueue[_Waiter] = FlowQueue(1, "fcfs", self.service, frozenset())
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf
        self.drain = DrainRate(clock)
        self.explain = False  # leases' decisions carry the candidates' scores (costs a pass)
        # A signal: each is called with a lease as it ends, its seconds from dispatch, and
        # whether it got its replica ejected (the gateway's metrics subscribe).
        self.lease_closed: list[Callable[[Lease, float, bool], None]] = []
        # A signal: each request that waited in the queue, or was refused a place in it, as it
        # leaves: its ticket, its seconds there, and how: "dispatched", "ttl-expired",
        # "evicted" (a more important request took its place), "queue-full", "left".
        self.dequeued: list[Dequeued] = []
        pool.changed.append(self._pool_changed)

    @property
    def queued(self) -> int:
        return len(self._queue)

    def waiting(self) -> dict[tuple[int, str], int]:
        """Requests waiting in this process per (class rank, tenant)."""
        return self._queue.waiting()

    def queued_everywhere(self) -> int:
        """Requests waiting for a slot in this gateway: with `workers: N`, in every worker."""
        shared = self.pool.shared
        return len(self._queue) if shared is None else shared.total_queued()

    def _publish_queue(self) -> None:
        if self.pool.shared is not None:
            self.pool.shared.set_queued(len(self._queue))

    @property
    def rules(self) -> Rules:
        assert self._rules is not None, "admission is configured before the first request"
        return self._rules

    def configure(self, rules: Rules) -> None:
        """The rules of a new config (policy, limits, flow control): a raised limit may let
        waiters go. Queued requests keep their places under the new classes and weights, and
        tenants their service."""
        self._rules = rules
        flow = rules.flow
        if flow is None:
            self._queue = self._queue.reshaped(
                1, "fcfs", self.service, frozenset(), lambda t: replace(t, rank=0)
            )
        else:
            self.service.half_life_s = flow.fairness_half_life_s
            sheddable = frozenset(i for i, c in enumerate(flow.classes) if c.sheddable)
            jobs = len(flow.classes)  # below every configured class
            last = jobs - 1

            def retag(ticket: Ticket) -> Ticket:
                rank = jobs if ticket.class_name == JOBS else flow.rank(ticket.class_name)
                weight = rules.weights.get(ticket.tenant, ticket.weight)
                return replace(ticket, rank=rank if rank >= 0 else last, weight=weight)

            self._queue = self._queue.reshaped(
                jobs + 1, flow.fairness, self.service, sheddable, retag, frozenset({jobs})
            )
        self.wake()

    def job_ticket(self, tenant: str) -> Ticket | None:
        """A deferred job's place under flow control: the durable class below every other;
        None without flow control (jobs then go only into idle capacity)."""
        flow = self.rules.flow
        if flow is None:
            return None
        return Ticket(tenant, JOBS, len(flow.classes))

    def retry_after_s(self) -> int:
        rate = self.drain.per_second()
        return 1 if rate <= 0 else max(1, min(60, math.ceil((self.queued + 1) / rate)))

    @asynccontextmanager
    async def lease(
        self,
        request: RequestInfo = NO_INFO,
        *,
        tried: Collection[Replica] = (),
        ticket: Ticket = DEFAULT_TICKET,
        excluded: Excluded | None = None,
        explain: bool = False,
    ) -> AsyncIterator[Lease]:
        """A replica with a free slot for this request (waiting in the queue, in the place its
        `ticket` gives it, if need be), held until the block exits; never one `excluded`
        says it may not use when it would take it. `explain`: the decision carries the
        candidates' scores even without routing.explain (a traced request)."""
        explain = explain or self.explain
        replica, reason, scores = await self._acquire(request, tried, ticket, excluded, explain)
        lease = self._dispatched(replica, request, reason, scores, explain=explain)
        try:
            yield lease
        finally:
            lease.close()

    def take(self, candidates: Sequence[Replica], request: RequestInfo = NO_INFO) -> Lease:
        """A lease on one of `candidates` (the caller checked their capacity), chosen by the
        policy; it never waits. The jobs scheduler dispatches this way."""
        replica = self.rules.policy_for(request.model).choose(candidates, request)
        self.pool.acquire(replica, request.tokens)
        return self._dispatched(replica, request, "job", candidates=candidates)

    def _dispatched(
        self,
        replica: Replica,
        request: RequestInfo,
        reason: str,
        scores: Scores = None,
        candidates: Sequence[Replica] = (),
        *,
        explain: bool = False,
    ) -> Lease:
        """The lease on a replica acquired for `request`, carrying the decision; with `explain`,
        the candidates' scores: those a free slot was chosen by (`scores`, as they were at the
        choice); else (handed over from the queue, a job) those of the available replicas of
        its model unless given, read just after (the chosen one already counts this request).
        Its policy hears where the request goes."""
        policy = self.rules.policy_for(request.model)
        if (explain or self.explain) and scores is None:
            candidates = candidates or self.pool.available_for(request.model)
            scores = policy.scores(candidates, request)
        policy.on_dispatch(replica, request)
        return Lease(self, replica, request, Decision(replica, policy.name, reason, scores))

    async def acquire(
        self,
        request: RequestInfo,
        tried: Collection[Replica] = (),
        ticket: Ticket = DEFAULT_TICKET,
    ) -> Replica:
        """A replica counted as dispatched to; prefer `lease`, which also releases it."""
        return (await self._acquire(request, tried, ticket))[0]

    async def _acquire(
        self,
        request: RequestInfo,
        tried: Collection[Replica],
        ticket: Ticket,
        excluded: Excluded | None = None,
        explain: bool = False,
    ) -> tuple[Replica, str, Scores]:
        """The replica, why (a free slot, or queued) and, with `explain`, the costs of the
        replicas a free slot was chosen among, as they were at the choice."""
        self.wake()  # an ejection may have run out since the last event
        free = self._take_free(request, tried, ticket.rank, excluded, explain)
        if free is not None:
            if ticket is not DEFAULT_TICKET:
                self._queue.charge(ticket)
            return free[0], "free slot", free[1]
        rules = self.rules
        loop = asyncio.get_running_loop()
        waiter = _Waiter(request, tried, loop.create_future(), self._clock(), excluded)
        durable = ticket.rank in self._queue.durable  # a job: it waits as long as it takes
        if not durable and self._queue.bounded() >= rules.max_queued:
            self._make_room(ticket)
        entry = self._queue.push(waiter, ticket)
        self._publish_queue()
        self._arm_timer()
        ttl_s = None if durable else rules.queue_ttl_s
        try:
            async with asyncio.timeout(ttl_s):
                replica = await waiter.future
            self._left(entry, "dispatched")
            return replica, "queued", None
        except TimeoutError:
            if _granted(waiter) is not None:
                self._left(entry, "dispatched")
                return waiter.future.result(), "queued", None  # the slot came as time ran out
            self._left(entry, "ttl-expired")
            self._raise_unavailable(tried, request.model)
            raise self._overloaded(
                f"no replica slot freed within {self._ttl_name()} = {ttl_s} s", "ttl-expired"
            ) from None
        except BaseException as exc:
            granted = _granted(waiter)
            if granted is not None:  # the client left as its slot came: pass the slot on
                self.pool.give_back(granted, request.tokens)
                self.wake()
            if not isinstance(exc, Overloaded | NoUntriedReplica):  # those told already
                self._left(entry, "left")
            raise
        finally:
            if not waiter.future.done():
                waiter.future.cancel()
            self._queue.remove(entry)
            self._publish_queue()

    def _make_room(self, ticket: Ticket) -> None:
        """The queue is full: the newest request of a less important sheddable class leaves it
        for this one (429 evicted), or this one is refused (429 queue-full)."""
        victim = self._queue.victim(ticket)
        if victim is None or victim.item.future.done():
            self._tell(ticket, 0.0, "queue-full")
            raise self._overloaded(
                "every replica is at its limit and the gateway queue is full", "queue-full"
            )
        self._queue.remove(victim)
        self._left(victim, "evicted")
        victim.item.future.set_exception(
            self._overloaded(
                "the gateway queue is full and a request of a more important class took this "
                "one's place",
                "evicted",
            )
        )

    def _ttl_name(self) -> str:
        return "flow_control.queue_ttl_s" if self.rules.flow else "limits.queue_timeout_s"

    def _left(self, entry: Entry[_Waiter], how: str) -> None:
        self._tell(entry.ticket, self._clock() - entry.item.since, how)

    def _tell(self, ticket: Ticket, waited_s: float, how: str) -> None:
        for subscriber in self.dequeued:
            subscriber(ticket, waited_s, how)

    def finish(self, lease: Lease, elapsed_s: float) -> None:
        """A lease's end: counts, failure streak, ejection, latency sample, metrics; then the
        freed slot goes to the queue."""
        rules, replica = self.rules, lease.replica
        settings = rules.outlier_detection
        count_5xx = settings is not None and settings.count_5xx
        outcome = "failed" if lease.broken else outcome_of(lease.code, count_5xx)
        self.pool.release(replica, outcome=outcome, tokens=lease.remaining)
        self.drain.tick()
        ejected = outlier.observe(self.pool, replica, settings) is not None
        publish_totals(replica)  # with `workers: N`, for the siblings' sums
        if outcome == "served":
            self.pool.observe_latency(replica, elapsed_s, lease.tokens, rules.ewma_decay_s)
        for subscriber in self.lease_closed:
            subscriber(lease, elapsed_s, ejected)
        self.wake()

    def wake(self) -> None:
        """Hand free slots to waiters, in the queue's order; one that may use none of them keeps
        its place and the next one is looked at."""
        if not self._queue or self._rules is None:
            return
        with self._claiming():
            while self._hand_out_one():
                pass
        self._arm_timer()

    def _hand_out_one(self) -> bool:
        """One free slot to the first waiter (in the queue's order) that may use one; False
        when no waiter may."""
        frees: dict[tuple[str | None, bool], Sequence[Replica]] = {}  # per model and reserve
        for entry in self._queue.in_order():
            waiter = entry.item
            if waiter.future.done():  # timed out or cancelled, not yet out of the queue
                continue
            model = waiter.request.model
            key = (model, self._reserved_from(entry.ticket.rank))
            free = frees.get(key)
            if free is None:
                free = frees[key] = self._free(model, entry.ticket.rank)
            if not free:
                if model is None and not key[1]:
                    return False
                continue  # a waiter for another model (or a more important class) may
            usable = waiter.usable(free)
            if not usable:
                continue
            replica = self.rules.policy_for(model).choose(usable, waiter.request)
            self.pool.acquire(replica, waiter.request.tokens)
            self._queue.granted(entry)
            self._publish_queue()
            waiter.future.set_result(replica)
            return True
        return False

    def _pool_changed(self) -> None:
        """The set of available replicas changed: a retry that has tried every one left stops
        waiting, and new ones may have free slots. Every policy hears of it
        (`replicas_changed`: one that keeps per-replica state drops what it knows of those that
        left)."""
        urls = [r.url for r in self.pool.active()]
        for policy in self._rules.policies() if self._rules is not None else ():
            policy.replicas_changed(urls)
        for entry in list(self._queue.entries()):
            waiter = entry.item
            tried, model = waiter.tried, waiter.request.model
            if tried and not waiter.future.done() and self._all_tried(tried, model):
                self._queue.remove(entry)
                self._left(entry, "left")
                waiter.future.set_exception(NoUntriedReplica())
        self.wake()

    def _take_free(
        self,
        request: RequestInfo,
        tried: Collection[Replica],
        rank: int = 0,
        excluded: Excluded | None = None,
        explain: bool = False,
    ) -> tuple[Replica, Scores] | None:
        if not self.pool.available_for(request.model):
            raise _no_healthy(request.model)
        if tried and self._all_tried(tried, request.model):
            raise NoUntriedReplica
        with self._claiming():
            usable = _usable(self._free(request.model, rank), tried, excluded)
            if not usable:
                return None
            policy = self.rules.policy_for(request.model)
            replica = policy.choose(usable, request)
            # The costs it chose by, before this request counts anywhere.
            scores = policy.scores(usable, request) if explain or self.explain else None
            self.pool.acquire(replica, request.tokens)
        return replica, scores

    def _claiming(self) -> AbstractContextManager[None]:
        """With `workers: N` and a slot limit in force, the check of free slots and the take
        of one happen under the workers' claim lock (gateway/pool/shared.py), so two workers never
        both take a replica's last slot, nor the gateway's last under `max_outstanding`."""
        shared = self.pool.shared
        if shared is None or not self._slots_limited():
            return nullcontext()
        return shared.claiming()

    def _slots_limited(self) -> bool:
        return self.rules.limits.max_outstanding is not None or self._replica_slots()

    def _replica_slots(self) -> bool:
        """Replicas may have slot limits: flow control (reported capacities), the configured
        per-replica limit, or some replica's own max_concurrency."""
        rules = self.rules
        return (
            rules.flow is not None
            or rules.limits.max_outstanding_per_replica is not None
            or bool(self.pool.replica_limits)
        )

    def _all_tried(self, tried: Collection[Replica], model: str | None) -> bool:
        return all(r in tried for r in self.pool.available_for(model))

    def _free(self, model: str | None = None, rank: int = 0) -> Sequence[Replica]:
        """Available replicas (of `model`) with a free slot for a request of class `rank`;
        none while the gateway-wide limit is reached."""
        limits = self.rules.limits
        available = self.pool.available_for(model)
        if (
            limits.max_outstanding is not None
            and self.pool.outstanding_everywhere() >= limits.max_outstanding
        ):
            return ()
        if not self._replica_slots():
            return available
        return [r for r in available if self.slot_free(r, rank)]

    def slot_free(self, replica: Replica, rank: int = 0) -> bool:
        """`replica` is under its slot limit (gateway/pool/slots.py) for a request of class
        `rank`; without one it always is."""
        limit = slot_limit(replica, self.rules, self.pool.now(), rank)
        return limit is None or replica.busy < limit

    def slots(self, replica: Replica) -> int | None:
        """How many requests `replica` takes at once from this gateway (None: no limit)."""
        return slot_limit(replica, self.rules, self.pool.now())

    def _reserved_from(self, rank: int) -> bool:
        return reserved_from(self.rules.flow, rank)

    def _arm_timer(self) -> None:
        """While requests wait, an ejection running out is an event too: look again then. With
        `workers: N` a sibling's release frees a slot this process hears nothing of: look again
        every SHARED_POLL_S while requests wait."""
        at = self.pool.next_return_at() if self._queue else math.inf
        if self._queue and self.pool.shared is not None:
            at = min(at, self.pool.now() + SHARED_POLL_S)
        if at >= self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = at
        delay = max(0.0, at - self.pool.now())
        self._timer = asyncio.get_running_loop().call_later(delay, self._on_timer)

    def _on_timer(self) -> None:
        self._timer, self._timer_at = None, math.inf
        self.wake()

    def _raise_unavailable(self, tried: Collection[Replica], model: str | None) -> None:
        if not self.pool.available_for(model):
            raise _no_healthy(model)
        if tried and self._all_tried(tried, model):
            raise NoUntriedReplica

    def _overloaded(self, message: str, reason: str) -> Overloaded:
        retry = str(self.retry_after_s())
        return Overloaded(message, headers={"Retry-After": retry, DROPPED_HEADER: reason})


def _no_healthy(model: str | None) -> NoHealthyReplica:
    if model is None:
        return NoHealthyReplica("no healthy replica to route to; see /admin/replicas")
    return NoHealthyReplica(
        f"no healthy replica serves model '{clipped(model)}'; see /admin/replicas"
    )


def _granted(waiter: _Waiter) -> Replica | None:
    future = waiter.future
    if future.done() and not future.cancelled() and future.exception() is None:
        return future.result()
    return None

"""One shape for the control loops that ask replicas over HTTP (health, load feedback, served
models, cache blocks): a Probe says what to ask and what an answer means, a ProbeLoop asks it
on its schedule, with one rule for the clock and one for failures.

Each round the probe plans from the live gateway (`plan`): how often, how long an answer may
take, how much of a body is read, whom to ask (Asks), and the pure parser that turns a status
and a body into a value; None turns it off (looked at again every `reload.poll_interval_s`, as
a reload may switch it on). The loop asks everyone in the round at once and hands each parsed
answer to `apply`. A replica's failure (the connection, the clock, the size cap, a malformed
answer: PROBE_FAILURES, nothing else, so a bug of ours still shows) goes to `failed` and costs
that replica's answer only; it is logged once per bad streak, without a traceback.

The clock: a probe with a `timeout_s` in its config (health_check, served_models) uses it;
the others use `poll_timeout(interval_s)`: the interval, at most 1 s and at least 250 ms (a
busy machine can take longer than a tiny interval to answer; a replica is not failed for that),
so a slow replica holds its round up for no more than that.

What the loop knows of a replica (its failure streak, whether it was asked) is forgotten when
the replica leaves the pool, and the probe is told (`keep`) to forget its own. `fetch` and
`sleep` are injectable: tests drive rounds without sockets or real time.
"""

from __future__ import annotations

import asyncio
import logging
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass
from typing import ClassVar, Generic, TypeVar

from gateway.control.fetch import POLL_FAILURES, Fetch, PollFailures
from gateway.pool.live import Live
from gateway.routing.replica import Replica

T = TypeVar("T")
Sleep = Callable[[float], Awaitable[None]]
MAX_POLL_TIMEOUT_S = 1.0
MIN_POLL_TIMEOUT_S = 0.25


def poll_timeout(interval_s: float) -> float:
    """How long an answer may take when the config does not say: the poll interval, capped."""
    return max(MIN_POLL_TIMEOUT_S, min(MAX_POLL_TIMEOUT_S, interval_s))


class ProbeAnswerError(ValueError):
    """A replica's answer that is well-formed but not what the probe asked for."""


PROBE_FAILURES = (*POLL_FAILURES, ProbeAnswerError)


@dataclass(frozen=True, eq=False)
class Ask:
    """One question to one replica: GET replica.url + path, about `model` when given."""

    replica: Replica
    path: str
    model: str | None = None

    @property
    def params(self) -> dict[str, str] | None:
        return None if self.model is None else {"model": self.model}


@dataclass(frozen=True)
class Plan(Generic[T]):
    asks: Sequence[Ask]
    parse: Callable[[int, bytes], T]  # pure: (status, body) -> value, or PROBE_FAILURES
    interval_s: float
    timeout_s: float
    max_bytes: int  # of a 200's body; 0: the status alone, no body is read
    new_replica_s: float | None = None  # a replica that joins is asked this soon, not next round


class Probe(ABC, Generic[T]):
    """One kind of question to the replicas; the hooks below `apply` are no-ops here."""

    name: ClassVar[str]  # in log lines
    consequence: ClassVar[str | None]  # what a failing replica costs, logged; None: not logged
    log: ClassVar[logging.Logger]

    @abstractmethod
    def plan(self) -> Plan[T] | None:
        """This round's plan; None: off."""

    @abstractmethod
    def apply(self, ask: Ask, value: T) -> None: ...

    def failed(self, ask: Ask, error: Exception) -> None:
        """The replica's answer was not read (its last one stands)."""

    def keep(self, present: Collection[Replica]) -> None:
        """Forget replicas that left the pool."""

    def round_done(self) -> None:
        """A whole round was asked and applied."""

    def off(self) -> None:
        """The probe is off (called every time the loop looks again)."""


class ProbeLoop(Generic[T]):
    def __init__(
        self, probe: Probe[T], live: Live, fetch: Fetch, sleep: Sleep = asyncio.sleep
    ) -> None:
        self.probe = probe
        self._live = live
        self._fetch = fetch
        self._sleep = sleep
        self._failures = PollFailures(probe.log, probe.name, probe.consequence or "")
        self._asked: set[Replica] = set()

    async def run(self) -> None:
        while True:
            plan = self.probe.plan()
            if plan is None:
                self.probe.off()
                await self._sleep(self._live.runtime.config.reload.poll_interval_s)
                continue
            await self.round(plan)
            self.probe.round_done()
            await self._until_next(plan)

    async def _until_next(self, plan: Plan[T]) -> None:
        """Sleep an interval; with `new_replica_s`, in steps that ask the replicas that joined."""
        if plan.new_replica_s is None:
            await self._sleep(plan.interval_s)
            return
        for _ in range(max(1, round(plan.interval_s / plan.new_replica_s))):
            await self._sleep(min(plan.new_replica_s, plan.interval_s))
            latest = self.probe.plan()
            if latest is None:
                return
            await self.round(latest, only_new=True)

    async def round(self, plan: Plan[T], only_new: bool = False) -> None:
        """Ask everyone in the plan (`only_new`: those not asked yet) at once."""
        present = self._live.pool.all()
        self._failures.keep({replica.url for replica in present})
        self._asked.intersection_update(present)
        self.probe.keep(present)
        asks = [a for a in plan.asks if not (only_new and a.replica in self._asked)]
        await asyncio.gather(*(self._ask(plan, ask) for ask in asks))

    async def _ask(self, plan: Plan[T], ask: Ask) -> None:
        self._asked.add(ask.replica)
        url = ask.replica.url
        try:
            async with asyncio.timeout(plan.timeout_s):
                status, body = await self._fetch(url + ask.path, ask.params, plan.max_bytes)
            value = plan.parse(status, body)
        except PROBE_FAILURES as error:
            if self.probe.consequence is not None:
                self._failures.failed(url, error)
            self.probe.failed(ask, error)
            return
        self._failures.ok(url)
        self.probe.apply(ask, value)

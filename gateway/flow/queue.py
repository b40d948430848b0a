"""The order in which the gateway queue hands out replica slots (gateway/pool/admission.py holds
the waiting requests and their futures; this module only orders them).

Strict by class: a request of a more important class always goes before one of a less
important class. Within a class, between tenants, by the fairness rule:
- `fcfs`: arrival order, tenants ignored (today's one FIFO queue is one class of this);
- `round_robin`: the tenant whose turn came longest ago first;
- `tokens`: the tenant with the least service lately per unit of weight first
  (gateway/flow/service.py), ties by arrival.
Within a tenant, arrival order. `in_order` yields the waiting entries in that order; the
caller hands a slot to the first one that can use a free replica (one waiting for a model with
no free replica keeps its place, and the next one is looked at: work-conserving) and tells the
queue (`granted`), which charges the tenant and changes the order.

When the queue is full, `victim` names the request to refuse or take out: the newest of the
least important class present, the arriving one included, taken out only if its class is
sheddable (otherwise the arriving request is refused). A durable class (deferred jobs, below
every configured class: JOBS) is never shed and does not count towards the queue's bound: its
requests go back to the job store, never away.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Generic, Literal, TypeVar

from gateway.flow.service import Service

T = TypeVar("T")
Fairness = Literal["fcfs", "round_robin", "tokens"]


@dataclass(frozen=True, slots=True)
class Ticket:
    """Who a request is from, as the queue orders it: its tenant, its class (by name and by
    rank, 0 the most important), its tenant's weight, and what its tenant is charged when it
    is dispatched (the data path charges the prompt's tokens, and the rest when it ends)."""

    tenant: str = "default"
    class_name: str = ""
    rank: int = 0
    weight: float = 1.0
    cost: float = 1.0


DEFAULT_TICKET = Ticket()
JOBS = "jobs"  # the class of deferred jobs and batch lines: the last, durable
MAX_TURNS = 10_000  # round_robin: tenants whose last turn is remembered


@dataclass(eq=False, slots=True)
class Entry(Generic[T]):
    item: T
    ticket: Ticket
    seq: int = 0  # arrival order, set by the queue


@dataclass(eq=False)
class _Class(Generic[T]):
    tenants: dict[str, deque[Entry[T]]] = field(default_factory=dict)
    size: int = 0


class FlowQueue(Generic[T]):
    def __init__(
        self,
        classes: int,
        fairness: Fairness,
        service: Service,
        sheddable: frozenset[int],
        durable: frozenset[int] = frozenset(),
    ) -> None:
        self._classes: list[_Class[T]] = [_Class() for _ in range(classes)]
        self.fairness = fairness
        self.service = service
        self.sheddable = sheddable
        self.durable = durable
        self._seq = itertools.count()
        self._turns = itertools.count(1)
        self._last_turn: dict[str, int] = {}  # round_robin: tenant -> its last turn
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def bounded(self) -> int:
        """Entries that count towards the queue's bound: all but the durable classes'."""
        return self._size - sum(self._classes[rank].size for rank in self.durable)

    def push(self, item: T, ticket: Ticket) -> Entry[T]:
        entry = Entry(item, ticket, next(self._seq))
        cls = self._classes[min(ticket.rank, len(self._classes) - 1)]
        cls.tenants.setdefault(ticket.tenant, deque()).append(entry)
        cls.size += 1
        self._size += 1
        return entry

    def remove(self, entry: Entry[T]) -> bool:
        cls = self._classes[min(entry.ticket.rank, len(self._classes) - 1)]
        waiting = cls.tenants.get(entry.ticket.tenant)
        if waiting is None:
            return False
        try:
            waiting.remove(entry)
        except ValueError:
            return False
        if not waiting:
            del cls.tenants[entry.ticket.tenant]
        cls.size -= 1
        self._size -= 1
        return True

    def granted(self, entry: Entry[T]) -> None:
        """`entry` got its slot: out of the queue, and its tenant's turn or service counts it."""
        self.remove(entry)
        self.charge(entry.ticket)

    def charge(self, ticket: Ticket) -> None:
        """A request of `ticket` was dispatched (from the queue or straight to a free slot)."""
        if self.fairness == "round_robin":
            self._last_turn[ticket.tenant] = next(self._turns)
            if len(self._last_turn) > MAX_TURNS:  # without auth a header names any tenant
                self._forget_turns()
        elif self.fairness == "tokens":
            self.service.charge(ticket.tenant, ticket.cost)

    def _forget_turns(self) -> None:
        """Keep the turns of the tenants waiting now, and of the latest others."""
        waiting = {t for cls in self._classes for t in cls.tenants}
        latest = sorted(self._last_turn.items(), key=lambda item: item[1])[-MAX_TURNS // 2 :]
        self._last_turn = {t: turn for t, turn in self._last_turn.items() if t in waiting} | dict(
            latest
        )

    def in_order(self) -> Iterator[Entry[T]]:
        """Every waiting entry, in the order slots go to them, computed lazily (taking the first
        costs one ordering of the first class's tenants). The queue must not change while this
        runs: a caller that grants a slot starts again."""
        for cls in self._classes:
            if cls.size:
                yield from self._class_order(cls)

    def _class_order(self, cls: _Class[T]) -> Iterator[Entry[T]]:
        queues = list(cls.tenants.values())
        if len(queues) == 1:
            return iter(queues[0])
        if self.fairness == "fcfs":
            return heapq.merge(*queues, key=lambda e: e.seq)
        if self.fairness == "round_robin":
            turn = self._last_turn
            queues.sort(key=lambda q: (turn.get(q[0].ticket.tenant, 0), q[0].seq))
        else:
            value = self.service.value
            queues.sort(key=lambda q: (value(q[0].ticket.tenant) / q[0].ticket.weight, q[0].seq))
        return itertools.chain.from_iterable(queues)

    def victim(self, arriving: Ticket) -> Entry[T] | None:
        """The queue is full and `arriving` would join it: the entry to take out for it (the
        newest of the least important sheddable class below it), or None: refuse `arriving`."""
        for rank in range(len(self._classes) - 1, arriving.rank, -1):
            cls = self._classes[rank]
            if cls.size and rank not in self.durable:
                if rank not in self.sheddable:
                    return None
                return max((q[-1] for q in cls.tenants.values()), key=lambda e: e.seq)
        return None

    def waiting(self) -> dict[tuple[int, str], int]:
        """Requests waiting per (class rank, tenant)."""
        return {
            (rank, tenant): len(q)
            for rank, cls in enumerate(self._classes)
            for tenant, q in cls.tenants.items()
        }

    def entries(self) -> Iterator[Entry[T]]:
        for cls in self._classes:
            for waiting in cls.tenants.values():
                yield from waiting

    def reshaped(
        self,
        classes: int,
        fairness: Fairness,
        service: Service,
        sheddable: frozenset[int],
        retag: Callable[[Ticket], Ticket],
        durable: frozenset[int] = frozenset(),
    ) -> FlowQueue[T]:
        """The same waiting entries under new rules (a reload), in their arrival order, each
        ticket as `retag` makes it (its class's new rank, its tenant's new weight)."""
        queue: FlowQueue[T] = FlowQueue(classes, fairness, service, sheddable, durable)
        queue._seq, queue._turns, queue._last_turn = self._seq, self._turns, self._last_turn
        for entry in sorted(self.entries(), key=lambda e: e.seq):
            entry.ticket = retag(entry.ticket)
            cls = queue._classes[min(entry.ticket.rank, classes - 1)]
            cls.tenants.setdefault(entry.ticket.tenant, deque()).append(entry)
            cls.size += 1
            queue._size += 1
        return queue

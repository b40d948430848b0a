"""Service attained by each tenant lately: the weighted tokens it was served, decaying with a
half-life, which `fairness: tokens` orders a class's tenants by (the least served first, per
unit of weight). A request's prompt is charged when it is dispatched (it is prefilled at once)
and its completion when it ends, from its usage, so what a tenant has attained is what it was
served: asking for little and getting much, or many short requests against few long ones,
buys no larger share.

A value is kept as (amount, time) and decayed when read; with `workers: N` each worker keeps
its own (SharedService would sum them); one process's counters live here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

# A tenant charged nothing for this many half-lives is forgotten (its value is below 2**-30 of
# what it was): the table holds only tenants seen lately, and at most MAX_TENANTS (past it, the
# least served half go: without auth a header names the tenant, any number of them).
FORGET_HALF_LIVES = 30
MAX_TENANTS = 10_000


@dataclass(frozen=True, slots=True)
class Usage:
    """Tokens one request was (or is expected to be) served."""

    prompt: int = 0
    completion: int = 0

    def weighted(self, output_weight: float) -> float:
        return self.prompt + output_weight * self.completion


class Service(Protocol):
    """Where attained service is kept: one process (LocalService) or every worker's
    (gateway/flow/service_shared.py)."""

    half_life_s: float

    def value(self, tenant: str) -> float: ...

    def charge(self, tenant: str, amount: float) -> None: ...


class LocalService:
    """One process's decaying counters; `half_life_s` may change with a reload."""

    def __init__(self, half_life_s: float, clock: Callable[[], float]) -> None:
        self.half_life_s = half_life_s
        self._clock = clock
        self._values: dict[str, tuple[float, float]] = {}  # tenant -> (amount, at)

    def value(self, tenant: str) -> float:
        amount, at = self._values.get(tenant, (0.0, 0.0))
        return amount * self._decay(self._clock() - at) if amount else 0.0

    def charge(self, tenant: str, amount: float) -> None:
        now = self._clock()
        self._values[tenant] = (max(0.0, self.value(tenant) + amount), now)
        size = len(self._values)
        if size > MAX_TENANTS or (size > 64 and math.log2(size).is_integer()):
            self._forget(now)

    def values(self) -> Mapping[str, float]:
        """Every tenant's value now (the status page's table)."""
        return {tenant: self.value(tenant) for tenant in self._values}

    def _decay(self, elapsed_s: float) -> float:
        return float(0.5 ** (max(0.0, elapsed_s) / self.half_life_s))

    def _forget(self, now: float) -> None:
        horizon = FORGET_HALF_LIVES * self.half_life_s
        for tenant, (_, at) in list(self._values.items()):
            if now - at > horizon:
                del self._values[tenant]
        if len(self._values) > MAX_TENANTS:
            kept = sorted(self._values, key=self.value, reverse=True)[: MAX_TENANTS // 2]
            self._values = {tenant: self._values[tenant] for tenant in kept}

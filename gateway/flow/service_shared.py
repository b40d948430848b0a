"""Tenants' service (gateway/flow/service.py) shared by the worker processes of one gateway
(`workers: N`), so that `fairness: tokens` orders each worker's queue by what every worker
served each tenant, not by its own share alone.

One shared-memory segment holds, per tenant slot (found by a 64-bit hash of the tenant's name
in an open-addressed table, under a file lock, the first time a worker meets the tenant), one
(amount, time) pair per worker row: a worker writes only its own row, lock-free, and a reader
decays and sums the rows. A pair is two 8-byte stores, so a reader may see a new amount with
the old time for an instant: a value off by one decay step, which only tilts one ordering.
Tenants past the table's slots (headers can name any number without `auth`) are served from
this worker's own counters instead.

    [ hashes: slots x u64 ][ values: workers x slots x (amount f64, time f64) ]
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Callable
from itertools import pairwise
from pathlib import Path
from typing import Any

from gateway.flow.service import LocalService
from gateway.sharedmem import claim, name_hash, segment

DEFAULT_SLOTS = 4096


class SharedService:
    """A Service (gateway/flow/service.py) over every worker's counters."""

    def __init__(
        self, name: str, workers: int, row: int, *, slots: int = DEFAULT_SLOTS,
        lock_path: Path, clock: Callable[[], float], half_life_s: float = 60.0,
        create: bool = False,
    ) -> None:  # fmt: skip
        self.workers, self.slots, self.row = workers, slots, row
        self.half_life_s = half_life_s
        self._clock = clock
        values_at = slots * 8
        size = values_at + workers * slots * 16
        self._shm = segment(name, create, size)
        buf = self._shm.buf
        assert buf is not None
        slices = [buf[start:end] for start, end in pairwise([0, values_at, size])]
        self._hashes, self._values = slices[0].cast("Q"), slices[1].cast("d")
        self._views: list[memoryview[Any]] = [self._hashes, self._values, *slices]
        self._lock_path = lock_path
        if create:
            lock_path.touch()
        self._mine: dict[str, int] = {}  # tenant -> slot, or -1: no slot left (kept local)
        self._overflow = LocalService(half_life_s, clock)

    @property
    def name(self) -> str:
        return self._shm.name

    def value(self, tenant: str) -> float:
        slot = self._slot(tenant)
        if slot < 0:
            return self._overflow.value(tenant)
        now, total = self._clock(), 0.0
        for row in range(self.workers):
            at = (row * self.slots + slot) * 2
            amount = self._values[at]
            if amount:
                total += amount * self._decay(now - self._values[at + 1])
        return total

    def charge(self, tenant: str, amount: float) -> None:
        slot = self._slot(tenant)
        if slot < 0:
            self._overflow.half_life_s = self.half_life_s
            self._overflow.charge(tenant, amount)
            return
        now = self._clock()
        at = (self.row * self.slots + slot) * 2
        own = self._values[at] * self._decay(now - self._values[at + 1])
        # Never below what the other rows hold back: a correction cannot make the sum negative.
        others = self.value(tenant) - own
        self._values[at] = max(-others, own + amount)
        self._values[at + 1] = now

    def _decay(self, elapsed_s: float) -> float:
        return float(0.5 ** (max(0.0, elapsed_s) / self.half_life_s))

    def _slot(self, tenant: str) -> int:
        slot = self._mine.get(tenant)
        if slot is None:
            if len(self._mine) >= 2 * self.slots:  # tenants past the table, met lately
                self._mine = {t: s for t, s in self._mine.items() if s >= 0}
            slot = self._mine[tenant] = self._find(name_hash(tenant))
        return slot

    def _find(self, wanted: int) -> int:
        """The tenant's slot; -1 when the table is full (its counters stay local)."""
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            return claim(self._hashes, wanted)[0]
        finally:
            os.close(fd)

    def close(self) -> None:
        for view in self._views:
            view.release()
        self._shm.close()

    def unlink(self) -> None:
        self._shm.unlink()

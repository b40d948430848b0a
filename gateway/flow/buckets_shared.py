"""Per-key limit state shared by the worker processes of one gateway (`workers: N`): the Table
(gateway/flow/limits.py) under which every worker's limiter checks and takes a key's limits, so
that a key gets its limits once across the gateway, not once per worker.

One shared-memory segment holds, per key slot, the key's two buckets (level and time, float64)
and one in-flight count per worker row. A key's slot is found by a 64-bit hash of its name in an
open-addressed table in the same segment (as gateway/pool/shared.py finds a replica's column);
slots are never reclaimed, so a probe chain never breaks. Every check-and-take runs under one
fcntl file lock: it reads the buckets and the sum of the rows, and writes the buckets and its
own row only. When a worker dies, the supervisor clears its row (`clear_row`), so its requests
(gone with it) stop counting against max_parallel; what they took from the buckets stays taken.

The times in the segment are each worker's limiter clock: time.monotonic, one clock for every
process on a Linux host.

    [ hashes: slots x u64 ][ buckets: slots x 4 x f64 ][ in_flight: workers x slots x i64 ]
"""

from __future__ import annotations

import fcntl
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from itertools import pairwise
from pathlib import Path
from typing import Any, TypeVar

from gateway.flow.limits import Bucket, KeyState
from gateway.sharedmem import claim, name_hash, segment

T = TypeVar("T")
DEFAULT_SLOTS = 1024  # keys known at once across a gateway's workers
FIELDS = 4  # per slot: requests level, requests time, tokens level, tokens time


class SlotsFull(Exception):
    """Every slot holds a key: more keys than the segment was made for."""


class SharedBuckets:
    def __init__(
        self, name: str, workers: int, row: int, *, slots: int = DEFAULT_SLOTS,
        lock_path: Path, create: bool = False,
    ) -> None:  # fmt: skip
        self.workers, self.slots, self.row = workers, slots, row
        buckets_at = slots * 8
        in_flight_at = buckets_at + slots * FIELDS * 8
        size = in_flight_at + workers * slots * 8
        self._shm = segment(name, create, size)
        buf = self._shm.buf
        assert buf is not None
        slices = [buf[start:end] for start, end in pairwise([0, buckets_at, in_flight_at, size])]
        self._hashes, self._buckets, self._in_flight = (
            slices[0].cast("Q"), slices[1].cast("d"), slices[2].cast("q"),
        )  # fmt: skip
        self._views: list[memoryview[Any]] = [self._hashes, self._buckets, self._in_flight, *slices]
        self._lock_path = lock_path
        if create:
            lock_path.touch()
        self._fd: int | None = None  # opened on the first update, kept open
        self._thread_lock = threading.Lock()  # flock does not exclude within one open file
        self._mine: dict[str, int] = {}  # key -> slot, for the keys this worker has seen

    @property
    def name(self) -> str:
        return self._shm.name

    @contextmanager
    def _locked(self) -> Iterator[None]:
        with self._thread_lock:
            if self._fd is None:
                self._fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600)
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)

    def update(self, key: str, change: Callable[[KeyState], T]) -> T:
        with self._locked():
            slot = self._slot(key)
            state = self._read(slot)
            in_flight = state.in_flight
            result = change(state)  # if it raises, nothing is written
            self._write(slot, state)
            self._in_flight[self.row * self.slots + slot] += state.in_flight - in_flight
        return result

    def _slot(self, key: str) -> int:
        slot = self._mine.get(key)
        if slot is None:
            slot = self._mine[key] = self._find(name_hash(key))
        return slot

    def _find(self, wanted: int) -> int:
        slot, new = claim(self._hashes, wanted)
        if slot < 0:
            raise SlotsFull(f"all {self.slots} shared key slots are in use")
        if new:  # a new key, whose buckets start full
            self._write(slot, KeyState())
        return slot

    def _read(self, slot: int) -> KeyState:
        b, at = self._buckets, slot * FIELDS
        in_flight = sum(self._in_flight[w * self.slots + slot] for w in range(self.workers))
        return KeyState(Bucket(b[at], b[at + 1]), Bucket(b[at + 2], b[at + 3]), in_flight)

    def _write(self, slot: int, state: KeyState) -> None:
        b, at = self._buckets, slot * FIELDS
        b[at], b[at + 1] = state.requests.level, state.requests.at_s
        b[at + 2], b[at + 3] = state.tokens.level, state.tokens.at_s

    def clear_row(self, row: int) -> None:
        """A dead worker's requests in flight (the supervisor's, before it starts a new one)."""
        start = row * self.slots
        with self._locked():
            for slot in range(self.slots):
                self._in_flight[start + slot] = 0

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        for view in self._views:
            view.release()
        self._shm.close()

    def unlink(self) -> None:
        self._shm.unlink()

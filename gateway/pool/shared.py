"""Outstanding counts shared by the worker processes of one gateway (`workers: N`), exact and
lock-free on the request path.

One shared-memory segment holds a matrix of int64 counts, one row per worker and one column per
replica: a worker writes only its own row (an aligned 8-byte store, never torn), and a reader
sums a column, so no update is ever lost and no lock is taken per request. A replica's column is
found by its URL in a table of URL hashes in the same segment, filled and reclaimed under a file
lock (only when a replica first appears in a worker's pool); a column is reused once no worker
holds its replica (one `held` flag per worker and column) and its counts are all zero. When a
worker dies, the supervisor clears its row and flags, so its requests (gone with it) stop
counting.

Slot limits need more than exact sums: two workers that both see a replica's last slot free
would both take it. Where a limit is in force, a worker checks it and takes the slot under a
second file lock (`claiming`), held for the few microseconds of one pick; releases need none
(they only free slots).

    [ hashes: columns x u64 ][ held: workers x columns x u8 ][ counts: workers x columns x i64 ]
    [ queued: workers x i64 ][ totals: workers x i64 ]  (each worker's waiting and in-flight
    requests, for the gateway-wide limits)
    [ stats: workers x columns x STATS x i64 ]  (each worker's requests, errors and ejections
    per replica, for what an operator reads: /admin/replicas and the status page)

A worker publishes its stats as it finishes requests (`publish`: what it added since its last
publish), so they survive its death: the worker started in its place adds to them, as
prometheus-client's multiprocess counters do. A column taken over by another replica starts
from zero.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from itertools import pairwise
from pathlib import Path

from gateway.sharedmem import name_hash, segment

DEFAULT_COLUMNS = 4096  # replicas known at once across a gateway's workers
STATS = ("requests_total", "errors_total", "ejections_total")  # per worker and replica


class ColumnsFull(Exception):
    """Every column holds a replica some worker still has."""


class SharedCounts:
    def __init__(
        self, name: str, workers: int, row: int, *, columns: int = DEFAULT_COLUMNS,
        lock_path: Path, create: bool = False,
    ) -> None:  # fmt: skip
        self.workers, self.columns, self.row = workers, columns, row
        stats_size = workers * columns * len(STATS) * 8
        size = columns * 8 + workers * columns + workers * columns * 8 + workers * 16 + stats_size
        self._shm = segment(name, create, size)
        buf = self._shm.buf
        assert buf is not None
        held_at = columns * 8
        counts_at = held_at + workers * columns
        queued_at = counts_at + workers * columns * 8
        totals_at = queued_at + workers * 8
        stats_at = totals_at + workers * 8
        bounds = [0, held_at, counts_at, queued_at, totals_at, stats_at, size]
        slices = [buf[start:end] for start, end in pairwise(bounds)]
        self._hashes, self._held, self._counts, self._queued, self._totals, self._stats = (
            slices[0].cast("Q"), slices[1], slices[2].cast("q"), slices[3].cast("q"),
            slices[4].cast("q"), slices[5].cast("q"),
        )  # fmt: skip
        self._views = [
            self._hashes, self._counts, self._queued, self._totals, self._stats, *slices
        ]  # fmt: skip
        self._published: dict[int, tuple[int, ...]] = {}  # column -> this worker's last publish
        self._lock_path = lock_path
        self._claim_path = lock_path.with_name(lock_path.name + ".slots")
        self._claim_fd: int | None = None  # opened on the first claim, kept open
        if create:
            lock_path.touch()
            self._claim_path.touch()
        self._mine: dict[str, int] = {}  # url -> column, for the replicas this worker holds

    @property
    def name(self) -> str:
        return self._shm.name

    @contextmanager
    def _locked(self) -> Iterator[None]:
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    @contextmanager
    def claiming(self) -> Iterator[None]:
        """Held by one worker at a time while it checks a slot limit against every worker's
        counts and takes the slot it found: no two workers take the same last slot. Its own
        file, so a worker holding it may still find a new replica's column (`hold`)."""
        if self._claim_fd is None:
            self._claim_fd = os.open(self._claim_path, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self._claim_fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._claim_fd, fcntl.LOCK_UN)

    def hold(self, url: str) -> int:
        """The column of `url`, held by this worker until `drop`."""
        column = self._mine.get(url)
        if column is not None:
            return column
        wanted = name_hash(url)
        with self._locked():
            column = self._find(wanted)
            self._held[self.row * self.columns + column] = 1
        self._mine[url] = column
        return column

    def drop(self, url: str) -> None:
        """This worker no longer has `url` (its count there is zero)."""
        column = self._mine.pop(url, None)
        if column is not None:
            self._counts[self.row * self.columns + column] = 0
            self._held[self.row * self.columns + column] = 0
            self._published.pop(column, None)  # if it comes back, its counts start from zero

    def _find(self, wanted: int) -> int:
        start = wanted % self.columns
        reusable = None
        for step in range(self.columns):
            column = (start + step) % self.columns
            current = self._hashes[column]
            if current == wanted:
                return column
            if current == 0:
                break  # the probe chain ends: it is not in the table
            if reusable is None and self._unused(column):
                reusable = column
        else:
            column = -1
        if reusable is not None:  # a column nobody holds: reuse it (its counts are zero)
            column = reusable
            self._clear_stats(column)  # the previous replica's, not this one's
        elif column < 0:
            raise ColumnsFull(f"all {self.columns} shared replica columns are in use")
        self._hashes[column] = wanted
        return column

    def _stat_at(self, row: int, column: int) -> int:
        return (row * self.columns + column) * len(STATS)

    def _clear_stats(self, column: int) -> None:
        for row in range(self.workers):
            at = self._stat_at(row, column)
            for i in range(len(STATS)):
                self._stats[at + i] = 0

    def _unused(self, column: int) -> bool:
        return not any(
            self._held[w * self.columns + column] or self._counts[w * self.columns + column]
            for w in range(self.workers)
        )

    def set(self, column: int, value: int) -> None:
        """This worker's count at a column."""
        self._counts[self.row * self.columns + column] = value

    def total(self, column: int) -> int:
        """Every worker's count at a column."""
        counts, columns = self._counts, self.columns
        return sum(counts[w * columns + column] for w in range(self.workers))

    def set_queued(self, value: int) -> None:
        """Requests waiting in this worker's admission queue."""
        self._queued[self.row] = value

    def total_queued(self) -> int:
        return sum(self._queued[w] for w in range(self.workers))

    def set_outstanding(self, value: int) -> None:
        """This worker's requests in flight, over every replica."""
        self._totals[self.row] = value

    def total_outstanding(self) -> int:
        return sum(self._totals[w] for w in range(self.workers))

    def publish(self, column: int, values: tuple[int, ...]) -> None:
        """This worker's own totals at a column (in STATS order), as its pool counts them."""
        last = self._published.get(column, (0,) * len(STATS))
        if values == last:
            return
        at = self._stat_at(self.row, column)
        for i, (now, before) in enumerate(zip(values, last, strict=True)):
            self._stats[at + i] += now - before
        self._published[column] = values

    def stats(self, column: int) -> tuple[int, ...]:
        """Every worker's totals at a column, the dead ones' included, in STATS order."""
        sums = [0] * len(STATS)
        for row in range(self.workers):
            at = self._stat_at(row, column)
            for i in range(len(STATS)):
                sums[i] += self._stats[at + i]
        return tuple(sums)

    def clear_row(self, row: int) -> None:
        """A dead worker's counts and holds (the supervisor's, before it starts a new one);
        its stats stay, for the gateway's totals."""
        start = row * self.columns
        self._queued[row] = self._totals[row] = 0
        with self._locked():
            for column in range(self.columns):
                self._counts[start + column] = 0
                self._held[start + column] = 0

    def close(self) -> None:
        if self._claim_fd is not None:
            os.close(self._claim_fd)
            self._claim_fd = None
        for view in self._views:
            view.release()
        self._shm.close()

    def unlink(self) -> None:
        self._shm.unlink()

"""Deferred inference inside the gateway app: the store's lifetime, the scheduler and the
retention sweep (one background task), and the handle the HTTP routes use (`app[JOBS]`).

On start-up the store is opened and jobs a previous gateway left running are queued again; on
shutdown dispatches in flight are cancelled and their jobs queued again for the next start.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import sqlite3
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path

from aiohttp import web

from gateway.config import Jobs
from gateway.errors import ConfigError
from gateway.jobs.scheduler import Scheduler
from gateway.jobs.store import JobStore, ThreadedStore
from gateway.runtime import GatewayState

log = logging.getLogger(__name__)

SWEEP_INTERVAL_S = 60.0


class JobService:
    def __init__(self, state: GatewayState, settings: Jobs) -> None:
        self.state = state
        self.settings = settings
        self._store: ThreadedStore | None = None
        self._scheduler: Scheduler | None = None

    @property
    def store(self) -> ThreadedStore:
        assert self._store is not None, "the store is opened by the app's cleanup_ctx"
        return self._store

    @property
    def scheduler(self) -> Scheduler:
        assert self._scheduler is not None, "the scheduler is made with the store"
        return self._scheduler

    async def lifetime(self, app: web.Application) -> AsyncIterator[None]:
        path = Path(self.settings.store)
        with _exclusive(path):
            store = await self._open(path)
            self._store = store
            self._scheduler = Scheduler(self.state, store, self.settings)
            try:
                yield
            finally:
                await store.run(JobStore.recover)  # dispatches in flight were cancelled
                await store.close()

    async def _open(self, path: Path) -> ThreadedStore:
        try:
            store = await ThreadedStore.open(path, retention_s=self.settings.result_retention_s)
        except (OSError, sqlite3.Error) as exc:
            raise ConfigError(f"jobs.store: cannot open {path}: {exc}") from None
        queued, failed = await store.run(JobStore.recover, self.settings.max_attempts)
        if queued or failed:
            log.warning(
                "jobs: of the jobs the last gateway left running, %d are queued again and %d "
                "failed (their last allowed attempt)",
                queued,
                failed,
            )
        return store

    async def run(self) -> None:
        async with asyncio.TaskGroup() as group:
            group.create_task(self.scheduler.run(), name="jobs-scheduler")
            group.create_task(self._sweep(), name="jobs-retention")

    async def _sweep(self) -> None:
        while True:
            deleted = await self.store.run(JobStore.expire)
            if deleted:
                log.info("jobs: %d finished jobs past jobs.result_retention_s deleted", deleted)
            await asyncio.sleep(SWEEP_INTERVAL_S)


@contextmanager
def _exclusive(path: Path) -> Iterator[None]:
    """One gateway per store: a second one would re-queue the first one's running jobs. The
    kernel drops the lock when the holder dies, kill -9 included."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = path.with_name(path.name + ".lock").open("a")
    except OSError as exc:
        raise ConfigError(f"jobs.store: cannot open {path}: {exc}") from None
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(f"jobs.store: {path} is in use by another gateway") from None
        yield


JOBS = web.AppKey("jobs", JobService)

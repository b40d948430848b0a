"""Deferred inference inside the gateway app: the store's lifetime, the scheduler and the
retention sweep (background tasks), and the handle the HTTP routes use (`app[JOBS]`).

An SQLite store is one gateway's (a file lock keeps a second one out): on start-up the jobs a
previous gateway left running are queued again. A PostgreSQL store is shared: each gateway
renews the leases of the jobs it runs, and every gateway sweeps for leases that ran out (their
gateway died) and queues those jobs again. On shutdown, dispatches in flight are cancelled and
this gateway's running jobs go back to the queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import sqlite3
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path

from aiohttp import web

from gateway.config import Jobs, is_postgres_url, redacted
from gateway.control.fetch import Session
from gateway.errors import ConfigError
from gateway.jobs.quota import Quota
from gateway.jobs.scheduler import Scheduler
from gateway.jobs.store import SqliteStore, Store, StoreUnavailable
from gateway.ops.metrics import GatewayMetrics
from gateway.pool.live import Live

log = logging.getLogger(__name__)

SWEEP_INTERVAL_S = 60.0
DEADLINE_INTERVAL_S = 1.0  # how late a batch's lines may expire after its completion window


class JobService:
    def __init__(
        self,
        state: Live,
        settings: Jobs,
        metrics: GatewayMetrics,
        session: Session,
        quota: Quota | None = None,
    ) -> None:
        self.state = state
        self._metrics = metrics
        self._session = session
        self.settings = settings
        # Each key's share of the store (gateway/jobs/quota.py).
        self.quota = quota or Quota(settings.max_bytes_per_key, settings.max_lines_per_key)
        self._store: Store | None = None
        self._scheduler: Scheduler | None = None

    @property
    def store(self) -> Store:
        assert self._store is not None, "the store is opened by the app's cleanup_ctx"
        return self._store

    @property
    def scheduler(self) -> Scheduler:
        assert self._scheduler is not None, "the scheduler is made with the store"
        return self._scheduler

    async def lifetime(self, app: web.Application) -> AsyncIterator[None]:
        url = self.settings.store
        with contextlib.ExitStack() as stack:
            if not is_postgres_url(url):
                stack.enter_context(_exclusive(Path(url)))
            store = await self._open(url)
            self._store = store
            self._scheduler = Scheduler(
                self.state, store, self.settings, self._metrics, self._session
            )
            try:
                yield
            finally:
                try:
                    await store.release()  # dispatches in flight were cancelled
                except StoreUnavailable as exc:  # their leases run out; another gateway sweeps
                    log.warning("jobs: running jobs not handed back on shutdown: %s", exc)
                await store.close()

    async def _open(self, url: str) -> Store:
        settings = self.settings
        store: Store
        if is_postgres_url(url):
            import asyncpg  # only with a PostgreSQL store

            from gateway.jobs.postgres import PostgresStore

            try:
                store = await PostgresStore.open(
                    url, retention_s=settings.result_retention_s, lease_s=settings.lease_s,
                    quota=self.quota,
                )  # fmt: skip
            except (
                OSError, TimeoutError, ValueError, asyncpg.PostgresError, asyncpg.InterfaceError,
                RuntimeError,
            ) as exc:  # fmt: skip
                reason = str(exc) or type(exc).__name__
                raise ConfigError(f"jobs.store: cannot open {redacted(url)}: {reason}") from None
            log.info(
                "jobs: shared store %s; this gateway claims as %s", redacted(url), store.holder
            )
        else:
            try:
                store = await SqliteStore.open(
                    url, retention_s=settings.result_retention_s, quota=self.quota
                )
            except (OSError, sqlite3.Error) as exc:
                raise ConfigError(f"jobs.store: cannot open {url}: {exc}") from None
        try:
            queued, failed = await store.recover(settings.max_attempts)
        except StoreUnavailable as exc:  # it went away right after the connection was made
            await store.close()
            raise ConfigError(f"jobs.store: {exc}") from None
        if queued or failed:
            log.warning(
                "jobs: of the jobs a stopped gateway left running, %d are queued again and %d "
                "failed (their last allowed attempt)",
                queued,
                failed,
            )
        return store

    async def run(self) -> None:
        async with asyncio.TaskGroup() as group:
            group.create_task(self.scheduler.run(), name="jobs-scheduler")
            group.create_task(self._sweep(), name="jobs-retention")
            group.create_task(self._deadlines(), name="jobs-batch-deadlines")
            if self.store.shared:
                group.create_task(self._leases(), name="jobs-leases")

    async def _sweep(self) -> None:
        while True:
            try:
                deleted = await self.store.expire()
            except StoreUnavailable as exc:
                log.warning("jobs: retention sweep skipped: %s", exc)
            else:
                if deleted:
                    log.info("jobs: %d finished jobs past jobs.result_retention_s deleted", deleted)
            await asyncio.sleep(SWEEP_INTERVAL_S)

    async def _deadlines(self) -> None:
        """Every second: the lines of batches whose completion window closed end expired, and
        this gateway's dispatches of them stop (others' at their next lease renewal)."""
        while True:
            await asyncio.sleep(DEADLINE_INTERVAL_S)
            try:
                ended = await self.store.expire_batches()
            except StoreUnavailable as exc:
                log.warning("jobs: batch deadlines not checked: %s", exc)
                continue
            if ended:
                self.scheduler.abandon(ended)
                log.info("jobs: %d lines of batches past their completion window expired",
                         len(ended))  # fmt: skip

    async def _leases(self) -> None:
        """Shared store: renew this gateway's leases, stop dispatches of jobs it no longer
        holds (cancelled or taken over elsewhere), and queue again the jobs whose gateway
        stopped renewing."""
        settings = self.settings
        while True:
            await asyncio.sleep(settings.lease_s / 3)
            try:
                asked = self.scheduler.holding()
                self.scheduler.keep_only(asked, await self.store.renew(list(asked)))
                queued, failed = await self.store.recover(settings.max_attempts)
            except StoreUnavailable as exc:
                log.warning("jobs: leases not renewed: %s", exc)
                continue
            if queued or failed:
                log.warning(
                    "jobs: leases ran out on %d running jobs (their gateway stopped): %d queued "
                    "again, %d failed (their last allowed attempt)",
                    queued + failed,
                    queued,
                    failed,
                )
                self.scheduler.wake()


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

"""The job store on PostgreSQL: one database shared by several gateways (`jobs.store:
postgresql://user@host:port/db`), through an asyncpg connection pool, so the event loop never
waits on the database.

What SQLite's single-gateway lock gave, claims and leases give here:
- A claim takes the oldest queued job with `FOR UPDATE SKIP LOCKED`: two gateways claiming at
  once get different jobs, and neither waits for the other. It bumps `attempt`, names this
  gateway (`holder`, a fresh id per start) and sets `lease_until`, on the database's clock.
- Results are fenced as in SQLite: `finish` and `requeue` change a job only while it is
  running under the same attempt, so only the attempt that holds the claim writes a result.
- A gateway renews its leases on the jobs it is dispatching every `jobs.lease_s` / 3; the ids
  that come back are those it still holds, so a job cancelled or taken over elsewhere stops
  here too.
- A gateway that dies (kill -9 included) stops renewing; once a lease runs out, any gateway's
  recovery sweep queues the job again, or fails it when that was its last allowed attempt
  (`jobs.max_attempts` holds across crashes, as `attempt` lives in the row).
- A batch is complete when its last line ends. Every change to a batch's lines takes the
  batch's row lock first, so two gateways ending its last two lines at once see each other's.
- A key's quota (gateway/jobs/quota.py) is checked under the key's advisory lock, in the
  transaction that inserts the submit, so gateways submitting for one key at once cannot pass
  it together.

The schema is versioned (`infergate_schema`) and migrated at start-up under an advisory lock,
so gateways starting together apply each step once. Connection parameters the URL leaves out
(the password, say) come from libpq's environment variables (PGPASSWORD, PGPASSFILE, PGSSLMODE,
...), so a Kubernetes Secret can hold them.
"""

from __future__ import annotations

import functools
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Collection, Coroutine, Sequence
from contextlib import asynccontextmanager
from typing import Any, ParamSpec, TypeVar

import asyncpg

from gateway.errors import InvalidRequest
from gateway.jobs.model import (
    CANCELLED,
    EXPIRED,
    INPUT_DELETED,
    RESULTS_OF,
    Batch,
    BatchSpec,
    FileKind,
    Job,
    Outcome,
    Sending,
    StoredFile,
    line_row,
    new_id,
    output_files,
    spec_row,
)
from gateway.jobs.quota import UNLIMITED, Quota, Usage, stored_bytes
from gateway.jobs.requests import BatchLine, JobRequest
from gateway.jobs.store import StoreUnavailable

log = logging.getLogger(__name__)

NOW = "extract(epoch FROM clock_timestamp())"  # the database's clock, for leases
MIGRATION_LOCK = 0x6A6F6273  # pg_advisory_xact_lock key: 'jobs'
REPLICA_LOCK = 0x736C6F74  # with hashtext(url): one replica's job slots, 'slot'
QUOTA_LOCK = 0x6B657973  # with hashtext(owner): one key's quota, 'keys'

# Each step runs once, in order, in the transaction that records its number.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE batches (
        seq bigint GENERATED ALWAYS AS IDENTITY UNIQUE,
        id text PRIMARY KEY,
        created_at double precision NOT NULL,
        total integer NOT NULL,
        cancelled_at double precision,
        completed_at double precision,
        expires_at double precision,
        owner text NOT NULL DEFAULT ''
    );
    CREATE TABLE jobs (
        seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        id text NOT NULL UNIQUE,
        batch_id text,
        line integer,
        custom_id text,
        method text NOT NULL,
        url text NOT NULL,
        body text NOT NULL,
        status text NOT NULL,
        attempt integer NOT NULL DEFAULT 0,
        created_at double precision NOT NULL,
        started_at double precision,
        finished_at double precision,
        expires_at double precision,
        status_code integer,
        response text,
        error_code text,
        error_message text,
        owner text NOT NULL DEFAULT '',
        holder text,
        lease_until double precision
    );
    CREATE INDEX jobs_queued ON jobs (seq) WHERE status = 'queued';
    CREATE INDEX jobs_leases ON jobs (lease_until) WHERE status = 'running';
    CREATE INDEX jobs_by_holder ON jobs (holder) WHERE status = 'running';
    CREATE INDEX jobs_by_batch_status ON jobs (batch_id, status);
    CREATE INDEX jobs_by_batch_seq ON jobs (batch_id, seq);
    CREATE INDEX jobs_by_owner ON jobs (owner, seq);
    CREATE INDEX jobs_by_expiry ON jobs (expires_at) WHERE expires_at IS NOT NULL;
    CREATE INDEX batches_by_owner ON batches (owner, seq);
    CREATE INDEX batches_by_expiry ON batches (expires_at) WHERE expires_at IS NOT NULL;
    """,
    # The replica each attempt went to (a re-run after a gateway died goes back to it; the
    # jobs running there, of every gateway, are counted against jobs.max_outstanding_per_replica).
    """
    ALTER TABLE jobs ADD COLUMN replica text;
    CREATE INDEX jobs_running_by_replica ON jobs (replica) WHERE status = 'running';
    """,
    # Bytes of each job's body and answer, summed per owner against its quota.
    """
    ALTER TABLE jobs ADD COLUMN size bigint NOT NULL DEFAULT 0;
    UPDATE jobs SET size = octet_length(body) + coalesce(octet_length(response), 0);
    CREATE INDEX jobs_usage ON jobs (owner, status, size);
    """,
    # The OpenAI Files and Batches API: uploaded files, and what a batch created from one names.
    """
    ALTER TABLE batches ADD COLUMN input_file_id text, ADD COLUMN endpoint text,
        ADD COLUMN completion_window text, ADD COLUMN deadline double precision,
        ADD COLUMN metadata text, ADD COLUMN expired_at double precision;
    CREATE INDEX batches_by_deadline ON batches (deadline)
        WHERE deadline IS NOT NULL AND completed_at IS NULL;
    CREATE TABLE files (
        seq bigint GENERATED ALWAYS AS IDENTITY UNIQUE,
        id text PRIMARY KEY,
        owner text NOT NULL,
        purpose text NOT NULL,
        filename text NOT NULL,
        bytes bigint,
        created_at double precision NOT NULL,
        expires_at double precision,
        kind text NOT NULL,
        batch_id text,
        content bytea
    );
    CREATE INDEX files_by_owner ON files (owner, seq);
    CREATE INDEX files_by_batch ON files (batch_id) WHERE batch_id IS NOT NULL;
    CREATE INDEX files_by_expiry ON files (expires_at) WHERE expires_at IS NOT NULL;
    """,
)

JOB_COLUMNS = (
    "seq, id, batch_id, line, custom_id, method, url, body, status, attempt, created_at,"
    " started_at, finished_at, expires_at, status_code, response, error_code, error_message,"
    " owner, replica, size"
)
BATCH_COLUMNS = (
    "id, created_at, total, cancelled_at, completed_at, expires_at, owner, input_file_id,"
    " endpoint, completion_window, deadline, metadata, expired_at"
)
FILE_COLUMNS = "seq, id, owner, purpose, filename, bytes, created_at, expires_at, kind, batch_id"
ACTIVE = "('queued', 'running')"
TO_QUEUE = "status = 'queued', holder = NULL, lease_until = NULL"  # queued again, unclaimed

P = ParamSpec("P")
T = TypeVar("T")

# What a database that is down, restarting or refusing raises: the caller gets a 503.
UNAVAILABLE = (OSError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError,
               asyncpg.CannotConnectNowError, asyncpg.TooManyConnectionsError,
               asyncpg.AdminShutdownError, TimeoutError)  # fmt: skip
RETRIES = (asyncpg.DeadlockDetectedError, asyncpg.SerializationError)
# A value the database cannot hold (a NUL character in an id, say): the client's to fix, a 400.
REFUSED_VALUES = (asyncpg.CharacterNotInRepertoireError, asyncpg.UntranslatableCharacterError)


def _guarded(
    method: Callable[P, Coroutine[Any, Any, T]],
) -> Callable[P, Coroutine[Any, Any, T]]:
    """A store call: a deadlock between gateways (PostgreSQL aborts one side) is tried again;
    a database that cannot be reached is a StoreUnavailable (503), never a hang or a 500."""

    @functools.wraps(method)
    async def call(*args: P.args, **kwargs: P.kwargs) -> T:
        for attempt in range(3):
            try:
                return await method(*args, **kwargs)
            except RETRIES:
                if attempt == 2:
                    raise
            except REFUSED_VALUES:
                raise InvalidRequest(
                    "a value holds a character the job store cannot keep (NUL): remove it"
                ) from None
            except UNAVAILABLE as exc:
                raise StoreUnavailable(
                    f"the job store cannot be reached now ({type(exc).__name__}); try again"
                ) from exc
            except asyncpg.PostgresError as exc:  # read-only after a failover, a timeout, ...
                log.error("jobs: the store failed a %s", method.__name__, exc_info=exc)
                raise StoreUnavailable(
                    f"the job store failed ({type(exc).__name__}); try again"
                ) from exc
        raise AssertionError("unreachable")

    return call


def _job(row: asyncpg.Record) -> Job:
    return Job(**dict(row))


class PostgresStore:
    shared = True

    def __init__(
        self, pool: asyncpg.Pool, *, retention_s: float, lease_s: float,
        quota: Quota = UNLIMITED, clock: Callable[[], float] = time.time,
    ) -> None:  # fmt: skip
        self._pool = pool
        self._retention_s = retention_s
        self._lease_s = lease_s
        self._quota = quota
        self._clock = clock
        self.holder = uuid.uuid4().hex  # this gateway, for as long as it runs

    @classmethod
    async def open(
        cls, url: str, *, retention_s: float, lease_s: float, quota: Quota = UNLIMITED,
        timeout_s: float = 10.0,
    ) -> PostgresStore:  # fmt: skip
        """Connect (the pool keeps 1 to 8 connections), create or migrate the schema."""
        pool = await asyncpg.create_pool(
            url, min_size=1, max_size=8, timeout=timeout_s, command_timeout=30
        )
        try:
            await migrate(pool)
        except BaseException:
            await pool.close()
            raise
        return cls(pool, retention_s=retention_s, lease_s=lease_s, quota=quota)

    async def close(self) -> None:
        await self._pool.close()

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[asyncpg.Connection]:
        async with self._pool.acquire() as db, db.transaction():
            yield db

    # Submitting

    @_guarded
    async def add_job(self, request: JobRequest, *, owner: str = "") -> Job:
        body = request.body_json()
        async with self._transaction() as db:
            await self._admit(db, owner, 1, stored_bytes(body))
            row = await db.fetchrow(
                "INSERT INTO jobs (id, custom_id, method, url, body, status, created_at, owner,"
                f" size) VALUES ($1, $2, $3, $4, $5, 'queued', $6, $7, $8) RETURNING {JOB_COLUMNS}",
                new_id("job"), request.custom_id, request.method, request.url, body,
                self._clock(), owner, stored_bytes(body),
            )  # fmt: skip
        return _job(row)

    @_guarded
    async def add_batch(
        self, lines: Sequence[BatchLine], *, owner: str = "", spec: BatchSpec | None = None
    ) -> Batch:
        """The batch and all its lines in one transaction: it exists whole or not at all."""
        batch_id, now = new_id("batch"), self._clock()
        rows = [line_row(batch_id, line, now) for line in lines]
        async with self._transaction() as db:
            await self._admit(db, owner, len(rows), sum(row[-1] for row in rows))
            await db.execute(
                "INSERT INTO batches (id, created_at, total, owner, input_file_id, endpoint,"
                " completion_window, deadline, metadata)"
                " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
                batch_id, now, len(lines), owner, *spec_row(spec, now),
            )  # fmt: skip
            await db.copy_records_to_table(
                "jobs", records=[(*row, owner) for row in rows], columns=LINE_COLUMNS
            )
            await self._complete_if_done(db, batch_id, now)
        batch = await self.get_batch(batch_id, owner=owner)
        assert batch is not None
        return batch

    @_guarded
    async def usage(self, owner: str) -> Usage:
        async with self._pool.acquire() as db:
            return await _usage(db, owner)

    async def _admit(self, db: asyncpg.Connection, owner: str, lines: int, size: int) -> None:
        """QuotaExceeded unless the owner's quota holds this submit; the key's lock is held to
        the end of the caller's transaction, so concurrent submits are counted one by one."""
        if not self._quota.unlimited:
            await db.execute("SELECT pg_advisory_xact_lock($1, hashtext($2))", QUOTA_LOCK, owner)
            self._quota.admit(await _usage(db, owner), lines, size)

    # Dispatching

    @_guarded
    async def claim(self, passed_over: Sequence[str] = ()) -> Job | None:
        """The oldest queued job (not one of `passed_over`, nor one another gateway is
        claiming this instant), now running under a new attempt and this gateway's lease."""
        row = await self._pool.fetchrow(
            "UPDATE jobs SET status = 'running', attempt = attempt + 1, started_at = $1,"
            f" holder = $2, lease_until = {NOW} + $3"
            " WHERE seq = (SELECT seq FROM jobs WHERE status = 'queued'"
            " AND id <> ALL($4::text[]) ORDER BY seq LIMIT 1 FOR UPDATE SKIP LOCKED)"
            f" AND status = 'queued' RETURNING {JOB_COLUMNS}",
            self._clock(), self.holder, self._lease_s, list(passed_over),
        )  # fmt: skip
        return None if row is None else _job(row)

    @_guarded
    async def unclaim(self, job: Job) -> bool:
        """Back to the queue as it was before `claim` (it was never sent); fenced."""
        return await self._to_queue(job, ", attempt = attempt - 1, started_at = NULL")

    @_guarded
    async def sent(self, job: Job, replica: str, limit: int | None = None) -> Sending:
        """Record the replica this attempt goes to, before it is sent: "full" when `limit` jobs
        of any gateway run there already (counted under the replica's advisory lock, so two
        gateways cannot both take its last slot), "gone" when the job was cancelled or taken
        over meanwhile."""
        async with self._transaction() as db:
            if limit is not None:
                await db.execute(
                    "SELECT pg_advisory_xact_lock($1, hashtext($2))", REPLICA_LOCK, replica
                )
                running = await db.fetchval(
                    "SELECT count(*) FROM jobs WHERE replica = $1 AND status = 'running'"
                    " AND id <> $2",
                    replica, job.id,
                )  # fmt: skip
                if running >= limit:
                    return "full"
            done = await db.execute(
                "UPDATE jobs SET replica = $1 WHERE id = $2 AND status = 'running'"
                " AND attempt = $3",
                replica, job.id, job.attempt,
            )  # fmt: skip
        return "sent" if _count(done) == 1 else "gone"

    @_guarded
    async def finish(self, job: Job, outcome: Outcome) -> bool:
        """Record the result of this attempt; False when the job was cancelled or re-claimed
        meanwhile (then another attempt, or the cancel, owns its result)."""
        now = self._clock()
        async with self._transaction() as db:
            if job.batch_id is not None:
                await _lock_batches(db, [job.batch_id])
            row = await db.fetchrow(
                "UPDATE jobs SET status = $1, finished_at = $2, status_code = $3, response = $4,"
                " error_code = $5, error_message = $6, holder = NULL, lease_until = NULL,"
                " expires_at = CASE WHEN batch_id IS NULL THEN $7::double precision END,"
                " size = size + $10"
                " WHERE id = $8 AND status = 'running' AND attempt = $9 RETURNING batch_id",
                outcome.status, now, outcome.status_code, outcome.response, outcome.error_code,
                outcome.error_message, now + self._retention_s, job.id, job.attempt,
                stored_bytes(outcome.response),
            )  # fmt: skip
            if row is not None and row["batch_id"] is not None:
                await self._complete_if_done(db, row["batch_id"], now)
        return row is not None

    @_guarded
    async def requeue(self, job: Job) -> bool:
        """Back to the queue for another attempt (the replica failed: the next may go
        elsewhere); fenced like finish."""
        return await self._to_queue(job, ", replica = NULL")

    async def _to_queue(self, job: Job, also: str = "") -> bool:
        """`job` back to the queue (and the `also` assignments), only while it still runs
        under the same attempt."""
        done = await self._pool.execute(
            f"UPDATE jobs SET {TO_QUEUE}{also} WHERE id = $1 AND status = 'running'"
            " AND attempt = $2",
            job.id, job.attempt,
        )  # fmt: skip
        return _count(done) == 1

    @_guarded
    async def recover(self, max_attempts: int | None) -> tuple[int, int]:
        """Running jobs whose lease ran out (their gateway stopped renewing): (queued again,
        failed). With `max_attempts`, one whose lost attempt was the last allowed fails."""
        now = self._clock()
        async with self._transaction() as db:
            # One instant for every statement: a lease that runs out meanwhile waits for the
            # next sweep, so each job this sweep touches had its batch locked first.
            at: float = await db.fetchval(f"SELECT ({NOW})::double precision")
            expired = f"status = 'running' AND lease_until < {at!r}::double precision"
            batches = await db.fetch(f"SELECT DISTINCT batch_id FROM jobs WHERE {expired}")
            batch_ids = [r["batch_id"] for r in batches if r["batch_id"] is not None]
            await _lock_batches(db, batch_ids)
            failed: list[asyncpg.Record] = []
            if max_attempts is not None:
                failed = await db.fetch(
                    "UPDATE jobs SET status = 'failed', finished_at = $1,"
                    " error_code = 'attempts_exhausted', holder = NULL, lease_until = NULL,"
                    " error_message = 'the gateway running it stopped during attempt '"
                    " || attempt || ' of ' || $2::integer || '; not run again',"
                    " expires_at = CASE WHEN batch_id IS NULL THEN $3::double precision END"
                    f" WHERE {expired} AND attempt >= $2 RETURNING batch_id",
                    now, max_attempts, now + self._retention_s,
                )  # fmt: skip
            queued = await db.execute(f"UPDATE jobs SET {TO_QUEUE} WHERE {expired}")
            for batch_id in {r["batch_id"] for r in failed} - {None}:
                await self._complete_if_done(db, batch_id, now)
        return _count(queued), len(failed)

    @_guarded
    async def renew(self, job_ids: Collection[str]) -> set[str]:
        """Only the jobs named: one whose dispatch this gateway lost track of (its result
        could not be written while the database was away) runs out and is recovered."""
        if not job_ids:
            return set()
        rows = await self._pool.fetch(
            f"UPDATE jobs SET lease_until = {NOW} + $2"
            " WHERE holder = $1 AND id = ANY($3::text[]) AND status = 'running' RETURNING id",
            self.holder, self._lease_s, list(job_ids),
        )  # fmt: skip
        return {row["id"] for row in rows}

    @_guarded
    async def release(self) -> int:
        done = await self._pool.execute(
            f"UPDATE jobs SET {TO_QUEUE} WHERE holder = $1 AND status = 'running'", self.holder
        )
        return _count(done)

    # Cancelling

    @_guarded
    async def cancel_job(self, job_id: str, *, owner: str = "") -> tuple[Job | None, bool]:
        """(the job after, whether this call cancelled it); (None, False) when unknown."""
        now = self._clock()
        async with self._transaction() as db:
            batch_id = await db.fetchval(
                "SELECT batch_id FROM jobs WHERE id = $1 AND owner = $2", job_id, owner
            )
            if batch_id is not None:
                await _lock_batches(db, [batch_id])
            row = await db.fetchrow(
                "UPDATE jobs SET status = 'cancelled', finished_at = $1,"
                " error_code = 'cancelled', error_message = 'cancelled before it finished',"
                f" holder = NULL, lease_until = NULL, {INPUT_DELETED},"
                " expires_at = CASE WHEN batch_id IS NULL THEN $2::double precision END"
                f" WHERE id = $3 AND owner = $4 AND status IN {ACTIVE} RETURNING batch_id",
                now, now + self._retention_s, job_id, owner,
            )  # fmt: skip
            if row is not None and row["batch_id"] is not None:
                await self._complete_if_done(db, row["batch_id"], now)
        return await self.get_job(job_id, owner=owner), row is not None

    @_guarded
    async def cancel_batch(
        self, batch_id: str, *, owner: str = ""
    ) -> tuple[Batch | None, list[str]]:
        """(the batch after, ids of the jobs it cancelled); a finished batch is unchanged."""
        now = self._clock()
        cancelled: list[str] = []
        async with self._transaction() as db:
            changed = await db.execute(
                "UPDATE batches SET cancelled_at = $1 WHERE id = $2 AND owner = $3"
                " AND completed_at IS NULL AND cancelled_at IS NULL AND expired_at IS NULL",
                now, batch_id, owner,
            )  # fmt: skip
            if _count(changed):
                cancelled = await self._end_lines(db, batch_id, now, *CANCELLED)
        return await self.get_batch(batch_id, owner=owner), cancelled

    @_guarded
    async def expire_batches(self) -> list[str]:
        """Batches whose completion window closed: every line not yet ended ends expired
        (running ones too: their dispatches stop, here and, at their next renewal, at the
        gateway running them). The ids of the jobs it ended."""
        now = self._clock()
        ended: list[str] = []
        async with self._transaction() as db:
            rows = await db.fetch(
                "SELECT id FROM batches WHERE deadline <= $1 AND completed_at IS NULL"
                " AND cancelled_at IS NULL AND expired_at IS NULL"
                " ORDER BY id FOR UPDATE SKIP LOCKED",
                now,
            )
            for row in rows:
                await db.execute("UPDATE batches SET expired_at = $1 WHERE id = $2", now, row["id"])
                ended += await self._end_lines(db, row["id"], now, *EXPIRED)
        return ended

    async def _end_lines(
        self, db: asyncpg.Connection, batch_id: str, now: float, code: str, message: str
    ) -> list[str]:
        """End a batch's queued and running lines with `code` (their inputs deleted); the
        caller holds the batch's row lock."""
        rows = await db.fetch(
            "UPDATE jobs SET status = 'cancelled', finished_at = $1, error_code = $2,"
            f" error_message = $3, holder = NULL, lease_until = NULL, {INPUT_DELETED}"
            f" WHERE batch_id = $4 AND status IN {ACTIVE} RETURNING id",
            now, code, message, batch_id,
        )  # fmt: skip
        await self._complete_if_done(db, batch_id, now)
        return [row["id"] for row in rows]

    # Reading

    @_guarded
    async def get_job(self, job_id: str, *, owner: str = "") -> Job | None:
        row = await self._pool.fetchrow(
            f"SELECT {JOB_COLUMNS} FROM jobs WHERE id = $1 AND owner = $2", job_id, owner
        )
        return None if row is None else _job(row)

    @_guarded
    async def list_jobs(
        self, *, status: str | None, batch_id: str | None, after: str | None, limit: int,
        owner: str = "",
    ) -> tuple[list[Job], bool]:  # fmt: skip
        """A page of one owner's jobs, oldest first, and whether more follow."""
        where, args = ["owner = $1"], [owner]
        for column, value in (("status", status), ("batch_id", batch_id)):
            if value is not None:
                args.append(value)
                where.append(f"{column} = ${len(args)}")
        if after is not None:
            args.append(after)
            where.append(
                f"seq > COALESCE((SELECT seq FROM jobs WHERE id = ${len(args)} AND owner = $1), -1)"
            )
        rows = await self._pool.fetch(
            f"SELECT {JOB_COLUMNS} FROM jobs WHERE {' AND '.join(where)}"
            f" ORDER BY seq LIMIT ${len(args) + 1}",
            *args, limit + 1,
        )  # fmt: skip
        return [_job(row) for row in rows[:limit]], len(rows) > limit

    @_guarded
    async def get_batch(self, batch_id: str, *, owner: str = "") -> Batch | None:
        async with self._pool.acquire() as db:
            return await _batch(db, batch_id, owner)

    @_guarded
    async def list_batches(
        self, *, after: str | None, limit: int, owner: str = ""
    ) -> tuple[list[Batch], bool]:
        async with self._pool.acquire() as db:
            rows = await db.fetch(
                "SELECT id FROM batches WHERE owner = $1 AND seq > COALESCE("
                "(SELECT seq FROM batches WHERE id = $2 AND owner = $1), -1)"
                " ORDER BY seq LIMIT $3",
                owner, after, limit + 1,
            )  # fmt: skip
            batches = [await _batch(db, row["id"], owner) for row in rows[:limit]]
        return [b for b in batches if b is not None], len(rows) > limit

    @_guarded
    async def batch_results(
        self, batch_id: str, after_seq: int, limit: int, *, owner: str = "",
        kind: FileKind | None = None,
    ) -> list[Job]:  # fmt: skip
        """Finished lines of a batch in file order, a page at a time (results are streamed):
        all of them, or those of its output file (succeeded) or error file (the rest)."""
        rows = await self._pool.fetch(
            f"SELECT {JOB_COLUMNS} FROM jobs WHERE batch_id = $1 AND owner = $2 AND seq > $3"
            f" AND status NOT IN {ACTIVE}{RESULTS_OF[kind]} ORDER BY seq LIMIT $4",
            batch_id, owner, after_seq, limit,
        )  # fmt: skip
        return [_job(row) for row in rows]

    # Files

    @_guarded
    async def add_file(
        self, content: bytes, filename: str, *, owner: str = "", expires_s: float | None = None
    ) -> StoredFile:
        now = self._clock()
        async with self._transaction() as db:
            await self._admit(db, owner, 0, len(content))
            row = await db.fetchrow(
                "INSERT INTO files (id, owner, purpose, filename, bytes, created_at, expires_at,"
                " kind, content) VALUES ($1, $2, 'batch', $3, $4, $5, $6, 'upload', $7)"
                f" RETURNING {FILE_COLUMNS}",
                new_id("file", "-"), owner, filename, len(content), now,
                now + (expires_s or self._retention_s), content,
            )  # fmt: skip
        return StoredFile(**dict(row))

    @_guarded
    async def get_file(self, file_id: str, *, owner: str = "") -> StoredFile | None:
        row = await self._pool.fetchrow(
            f"SELECT {FILE_COLUMNS} FROM files WHERE id = $1 AND owner = $2", file_id, owner
        )
        return None if row is None else StoredFile(**dict(row))

    @_guarded
    async def file_content(self, file_id: str, *, owner: str = "") -> bytes | None:
        content = await self._pool.fetchval(
            "SELECT content FROM files WHERE id = $1 AND owner = $2 AND kind = 'upload'",
            file_id, owner,
        )  # fmt: skip
        return None if content is None else bytes(content)

    @_guarded
    async def list_files(
        self, *, purpose: str | None, after: str | None, limit: int, newest_first: bool,
        owner: str = "",
    ) -> tuple[list[StoredFile], bool]:  # fmt: skip
        """A page of one owner's files (OpenAI lists the newest first), and whether more follow."""
        where, args = ["owner = $1"], [owner]
        if purpose is not None:
            args.append(purpose)
            where.append(f"purpose = ${len(args)}")
        order, beyond, start = ("DESC", "<", "9e18") if newest_first else ("ASC", ">", "-1")
        if after is not None:
            args.append(after)
            where.append(
                f"seq {beyond} COALESCE((SELECT seq FROM files WHERE id = ${len(args)}"
                f" AND owner = $1), {start})"
            )
        rows = await self._pool.fetch(
            f"SELECT {FILE_COLUMNS} FROM files WHERE {' AND '.join(where)}"
            f" ORDER BY seq {order} LIMIT ${len(args) + 1}",
            *args, limit + 1,
        )  # fmt: skip
        return [StoredFile(**dict(row)) for row in rows[:limit]], len(rows) > limit

    @_guarded
    async def counted(self, file_id: str, size: int) -> None:
        await self._pool.execute("UPDATE files SET bytes = $1 WHERE id = $2", size, file_id)

    @_guarded
    async def delete_file(self, file_id: str, *, owner: str = "") -> bool:
        done = await self._pool.execute(
            "DELETE FROM files WHERE id = $1 AND owner = $2", file_id, owner
        )
        return _count(done) == 1

    # Retention

    @_guarded
    async def expire(self) -> int:
        """Delete finished jobs and batches past their retention; returns the jobs deleted."""
        now = self._clock()
        async with self._transaction() as db:
            deleted = await db.execute(
                "DELETE FROM jobs WHERE expires_at <= $1 OR batch_id IN"
                " (SELECT id FROM batches WHERE expires_at <= $1)",
                now,
            )
            await db.execute(
                "DELETE FROM files WHERE expires_at <= $1 OR batch_id IN"
                " (SELECT id FROM batches WHERE expires_at <= $1)",
                now,
            )
            await db.execute("DELETE FROM batches WHERE expires_at <= $1", now)
        return _count(deleted)

    async def _complete_if_done(self, db: asyncpg.Connection, batch_id: str, now: float) -> None:
        """The caller holds the batch's row lock (or inserted it in this transaction)."""
        active = await db.fetchval(
            f"SELECT 1 FROM jobs WHERE batch_id = $1 AND status IN {ACTIVE} LIMIT 1", batch_id
        )
        if active is None:
            owner = await db.fetchval(
                "UPDATE batches SET completed_at = $1, expires_at = $2"
                " WHERE id = $3 AND completed_at IS NULL RETURNING owner",
                now, now + self._retention_s, batch_id,
            )  # fmt: skip
            if owner is not None:
                counts = await db.fetch(
                    "SELECT status, count(*) AS n FROM jobs WHERE batch_id = $1 GROUP BY status",
                    batch_id,
                )
                files = output_files(
                    {r["status"]: r["n"] for r in counts}, batch_id, owner, now,
                    now + self._retention_s,
                )  # fmt: skip
                await db.executemany(
                    "INSERT INTO files (id, owner, purpose, filename, created_at, expires_at,"
                    " kind, batch_id) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                    files,
                )


async def migrate(pool: asyncpg.Pool) -> int:
    """Create or bring the schema up to date, each step once however many gateways start at
    the same time; returns the schema version."""
    async with pool.acquire() as db, db.transaction():
        await db.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
        await db.execute("CREATE TABLE IF NOT EXISTS infergate_schema (version integer NOT NULL)")
        version = await db.fetchval("SELECT max(version) FROM infergate_schema") or 0
        if version > len(MIGRATIONS):
            raise RuntimeError(
                f"the job store's schema is version {version}, newer than this gateway's "
                f"({len(MIGRATIONS)}): upgrade the gateway"
            )
        for step in range(version, len(MIGRATIONS)):
            await db.execute(MIGRATIONS[step])
            await db.execute("INSERT INTO infergate_schema (version) VALUES ($1)", step + 1)
            log.info("jobs: store schema migrated to version %d", step + 1)
    return len(MIGRATIONS)


async def _lock_batches(db: asyncpg.Connection, batch_ids: Sequence[str]) -> None:
    """Row locks on batches, in one order everywhere (no deadlock between two of these)."""
    if batch_ids:
        await db.execute(
            "SELECT 1 FROM batches WHERE id = ANY($1::text[]) ORDER BY id FOR UPDATE",
            sorted(set(batch_ids)),
        )


async def _usage(db: asyncpg.Connection, owner: str) -> Usage:
    row = await db.fetchrow(
        "SELECT count(*) FILTER (WHERE status <> 'cancelled') AS lines,"
        " coalesce(sum(size), 0)::bigint AS bytes FROM jobs WHERE owner = $1",
        owner,
    )
    uploaded = await db.fetchval(
        "SELECT coalesce(sum(bytes), 0)::bigint FROM files WHERE owner = $1 AND kind = 'upload'",
        owner,
    )
    return Usage(lines=row["lines"], bytes=row["bytes"] + uploaded)


async def _batch(db: asyncpg.Connection, batch_id: str, owner: str) -> Batch | None:
    row = await db.fetchrow(
        f"SELECT {BATCH_COLUMNS} FROM batches WHERE id = $1 AND owner = $2", batch_id, owner
    )
    if row is None:
        return None
    counts = await db.fetch(
        "SELECT status, count(*) AS n FROM jobs WHERE batch_id = $1 GROUP BY status", batch_id
    )
    return Batch(**dict(row), counts={r["status"]: r["n"] for r in counts})


LINE_COLUMNS = ("id", "batch_id", "line", "custom_id", "method", "url", "body", "status",
                "created_at", "finished_at", "error_code", "error_message", "size",
                "owner")  # fmt: skip


def _count(status: str) -> int:
    """The row count of a command tag: 'UPDATE 3' -> 3."""
    return int(status.rsplit(" ", 1)[1])

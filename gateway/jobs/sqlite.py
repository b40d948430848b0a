"""The durable job store on SQLite, in WAL mode: the one owner of job and batch state.

A job moves queued -> running -> succeeded | failed, or to cancelled from queued or running.
Each claim bumps the job's `attempt`; a result is written only by
`UPDATE ... WHERE id = ? AND status = 'running' AND attempt = ?`, so however many times a job
was dispatched (retries, a gateway restart), exactly one result is recorded. On start-up,
jobs left running by a crashed gateway go back to queued.

`JobStore` is synchronous and owns its connection; `SqliteStore` runs its methods on one
dedicated thread so the event loop never waits on disk, behind the async `Store` interface that
the PostgreSQL store (gateway/jobs/postgres.py) also provides. WAL with synchronous=NORMAL keeps
every commit across a process crash (kill -9); only a power loss may lose the last commits.

Every job and batch has an `owner`: the name of the API key that created it ('' without auth).
Every read and cancel a client makes is scoped to one owner, so another key's jobs are "not
found" and never listed. A store file from before owners gets the column when it is opened.
Each owner keeps at most its `Quota` of lines and bytes (gateway/jobs/quota.py): every job
row carries its `size`, checked in the transaction that inserts a submit; a cancel empties
the bodies of the jobs it stops (`size` 0) at once.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

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

WAL_LIMIT_BYTES = 64 * 1024 * 1024

SCHEMA = """
CREATE TABLE IF NOT EXISTS batches (
    id TEXT PRIMARY KEY,
    created_at REAL NOT NULL,
    total INTEGER NOT NULL,
    cancelled_at REAL,
    completed_at REAL,
    expires_at REAL,
    owner TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    batch_id TEXT,
    line INTEGER,
    custom_id TEXT,
    method TEXT NOT NULL,
    url TEXT NOT NULL,
    body TEXT NOT NULL,
    status TEXT NOT NULL,
    attempt INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    expires_at REAL,
    status_code INTEGER,
    response TEXT,
    error_code TEXT,
    error_message TEXT,
    owner TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS jobs_by_status ON jobs (status, seq);
CREATE INDEX IF NOT EXISTS jobs_by_batch ON jobs (batch_id);
CREATE INDEX IF NOT EXISTS jobs_by_batch_status ON jobs (batch_id, status);
CREATE INDEX IF NOT EXISTS jobs_by_expiry ON jobs (expires_at) WHERE expires_at IS NOT NULL;
CREATE TABLE IF NOT EXISTS files (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    owner TEXT NOT NULL,
    purpose TEXT NOT NULL,
    filename TEXT NOT NULL,
    bytes INTEGER,
    created_at REAL NOT NULL,
    expires_at REAL,
    kind TEXT NOT NULL,
    batch_id TEXT,
    content BLOB
);
CREATE INDEX IF NOT EXISTS files_by_owner ON files (owner, seq);
CREATE INDEX IF NOT EXISTS files_by_batch ON files (batch_id) WHERE batch_id IS NOT NULL;
"""
# Columns of a batch created in OpenAI's form (POST /v1/batches naming an uploaded file).
BATCH_SPEC_COLUMNS = {"input_file_id": "TEXT", "endpoint": "TEXT", "completion_window": "TEXT",
                      "deadline": "REAL", "metadata": "TEXT", "expired_at": "REAL"}  # fmt: skip
FILE_COLUMNS = "seq, id, owner, purpose, filename, bytes, created_at, expires_at, kind, batch_id"
# After the columns exist (a store from before owners gets them in _migrate).
OWNER_INDEXES = """
CREATE INDEX IF NOT EXISTS jobs_by_owner ON jobs (owner, seq);
CREATE INDEX IF NOT EXISTS jobs_usage ON jobs (owner, status, size);
CREATE INDEX IF NOT EXISTS batches_by_owner ON batches (owner);
CREATE INDEX IF NOT EXISTS batches_by_deadline ON batches (deadline)
    WHERE deadline IS NOT NULL AND completed_at IS NULL;
"""


class JobStore:
    def __init__(
        self, path: str | Path, *, retention_s: float, quota: Quota = UNLIMITED,
        clock: Callable[[], float] = time.time,
    ) -> None:  # fmt: skip
        self._db = sqlite3.connect(str(path), isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA busy_timeout=5000")
        # The WAL grows with the largest burst of writes (a big batch); cut it back after each
        # checkpoint instead of keeping its peak size on disk.
        self._db.execute(f"PRAGMA journal_size_limit={WAL_LIMIT_BYTES}")
        self._db.executescript(SCHEMA)
        self._migrate()
        self._retention_s = retention_s
        self._quota = quota
        self._clock = clock

    def close(self) -> None:
        self._db.close()

    def _migrate(self) -> None:
        """Bring a store file written by an older gateway up to this schema; idempotent."""
        for table in ("jobs", "batches"):
            columns = {row["name"] for row in self._db.execute(f"PRAGMA table_info({table})")}
            if "owner" not in columns:
                self._db.execute(f"ALTER TABLE {table} ADD COLUMN owner TEXT NOT NULL DEFAULT ''")
            for column, kind in BATCH_SPEC_COLUMNS.items() if table == "batches" else ():
                if column not in columns:
                    self._db.execute(f"ALTER TABLE batches ADD COLUMN {column} {kind}")
            if table == "jobs" and "replica" not in columns:
                self._db.execute("ALTER TABLE jobs ADD COLUMN replica TEXT")
            if table == "jobs" and "size" not in columns:
                with self._transaction() as db:
                    db.execute("ALTER TABLE jobs ADD COLUMN size INTEGER NOT NULL DEFAULT 0")
                    db.execute(
                        "UPDATE jobs SET size = length(CAST(body AS BLOB))"
                        " + coalesce(length(CAST(response AS BLOB)), 0)"
                    )
        self._db.executescript(OWNER_INDEXES)

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    # Submitting

    def add_job(self, request: JobRequest, *, owner: str = "") -> Job:
        job_id, body = new_id("job"), request.body_json()
        with self._transaction() as db:
            self._admit(owner, 1, stored_bytes(body))
            db.execute(
                "INSERT INTO jobs (id, custom_id, method, url, body, status, created_at, owner,"
                " size) VALUES (?, ?, ?, ?, ?, 'queued', ?, ?, ?)",
                (job_id, request.custom_id, request.method, request.url, body, self._clock(),
                 owner, stored_bytes(body)),
            )  # fmt: skip
        return self._job(job_id)

    def add_batch(
        self, lines: Sequence[BatchLine], *, owner: str = "", spec: BatchSpec | None = None
    ) -> Batch:
        """The batch and all its lines in one transaction: it exists whole or not at all."""
        batch_id, now = new_id("batch"), self._clock()
        rows = [line_row(batch_id, line, now) for line in lines]
        with self._transaction() as db:
            self._admit(owner, len(rows), sum(row[-1] for row in rows))
            db.execute(
                "INSERT INTO batches (id, created_at, total, owner, input_file_id, endpoint,"
                " completion_window, deadline, metadata) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (batch_id, now, len(lines), owner, *spec_row(spec, now)),
            )
            db.executemany(
                "INSERT INTO jobs (id, batch_id, line, custom_id, method, url, body, status,"
                " created_at, finished_at, error_code, error_message, size, owner)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [(*row, owner) for row in rows],
            )
            self._complete_if_done(batch_id, now)
        batch = self.get_batch(batch_id, owner=owner)
        assert batch is not None
        return batch

    def usage(self, owner: str) -> Usage:
        row = self._db.execute(
            "SELECT count(*) FILTER (WHERE status <> 'cancelled'), coalesce(sum(size), 0)"
            " FROM jobs WHERE owner = ?",
            (owner,),
        ).fetchone()
        uploaded = self._db.execute(
            "SELECT coalesce(sum(bytes), 0) FROM files WHERE owner = ? AND kind = 'upload'",
            (owner,),
        ).fetchone()[0]
        return Usage(lines=row[0], bytes=row[1] + uploaded)

    def _admit(self, owner: str, lines: int, size: int) -> None:
        """QuotaExceeded unless the owner's quota holds this submit (in its transaction)."""
        if not self._quota.unlimited:
            self._quota.admit(self.usage(owner), lines, size)

    # Dispatching

    def claim(self, passed_over: Sequence[str] = ()) -> Job | None:
        """The oldest queued job (not one of `passed_over`), now running under a new attempt
        number."""
        skip = f" AND id NOT IN ({','.join('?' * len(passed_over))})" if passed_over else ""
        row = self._db.execute(
            "UPDATE jobs SET status = 'running', attempt = attempt + 1, started_at = ?"
            " WHERE seq = (SELECT seq FROM jobs WHERE status = 'queued'" + skip
            + " ORDER BY seq LIMIT 1) RETURNING *",
            (self._clock(), *passed_over),
        ).fetchone()  # fmt: skip
        return None if row is None else Job(**row)

    def unclaim(self, job: Job) -> bool:
        """Back to the queue as it was before `claim` (it was never sent); fenced like finish."""
        cursor = self._db.execute(
            "UPDATE jobs SET status = 'queued', attempt = attempt - 1, started_at = NULL"
            " WHERE id = ? AND status = 'running' AND attempt = ?",
            (job.id, job.attempt),
        )
        return cursor.rowcount == 1

    def sent(self, job: Job, replica: str, limit: int | None = None) -> Sending:
        """Record the replica this attempt goes to, before it is sent: "full" when `limit` jobs
        run there already, "gone" when the job was cancelled meanwhile (fenced like finish)."""
        with self._transaction() as db:
            if limit is not None and db.execute(
                "SELECT count(*) FROM jobs WHERE replica = ? AND status = 'running' AND id <> ?",
                (replica, job.id),
            ).fetchone()[0] >= limit:  # fmt: skip
                return "full"
            cursor = db.execute(
                "UPDATE jobs SET replica = ? WHERE id = ? AND status = 'running' AND attempt = ?",
                (replica, job.id, job.attempt),
            )
        return "sent" if cursor.rowcount == 1 else "gone"

    def finish(self, job: Job, outcome: Outcome) -> bool:
        """Record the result of this attempt; False when the job was cancelled or re-claimed
        meanwhile (then another attempt, or the cancel, owns its result)."""
        now = self._clock()
        with self._transaction() as db:
            row = db.execute(
                "UPDATE jobs SET status = ?, finished_at = ?, status_code = ?, response = ?,"
                " error_code = ?, error_message = ?, size = size + ?,"
                " expires_at = CASE WHEN batch_id IS NULL THEN ? END"
                " WHERE id = ? AND status = 'running' AND attempt = ? RETURNING batch_id",
                (outcome.status, now, outcome.status_code, outcome.response, outcome.error_code,
                 outcome.error_message, stored_bytes(outcome.response), now + self._retention_s,
                 job.id, job.attempt),
            ).fetchone()  # fmt: skip
            if row is not None and row["batch_id"] is not None:
                self._complete_if_done(row["batch_id"], now)
        return row is not None

    def requeue(self, job: Job) -> bool:
        """Back to the queue for another attempt (the replica failed: the next may go
        elsewhere); fenced like finish."""
        cursor = self._db.execute(
            "UPDATE jobs SET status = 'queued', replica = NULL"
            " WHERE id = ? AND status = 'running' AND attempt = ?",
            (job.id, job.attempt),
        )
        return cursor.rowcount == 1

    def recover(self, max_attempts: int | None = None) -> tuple[int, int]:
        """Jobs left running by a gateway that stopped: (queued again, failed). With
        `max_attempts`, one whose attempt that was is the last allowed fails instead, so a job
        that crashes the gateway is not run forever; without it (our own shutdown cancelled
        them) all go back to the queue."""
        failed = 0
        if max_attempts is not None:
            now = self._clock()
            with self._transaction() as db:
                rows = db.execute(
                    "UPDATE jobs SET status = 'failed', finished_at = ?,"
                    " error_code = 'attempts_exhausted',"
                    " error_message = 'the gateway stopped during attempt ' || attempt ||"
                    " ' of ' || ? || '; not run again',"
                    " expires_at = CASE WHEN batch_id IS NULL THEN ? END"
                    " WHERE status = 'running' AND attempt >= ? RETURNING batch_id",
                    (now, max_attempts, now + self._retention_s, max_attempts),
                ).fetchall()
                for batch_id in {row["batch_id"] for row in rows} - {None}:
                    self._complete_if_done(batch_id, now)
            failed = len(rows)
        cursor = self._db.execute("UPDATE jobs SET status = 'queued' WHERE status = 'running'")
        return cursor.rowcount, failed

    # Cancelling

    def cancel_job(self, job_id: str, *, owner: str = "") -> tuple[Job | None, bool]:
        """(the job after, whether this call cancelled it); (None, False) when unknown."""
        now = self._clock()
        with self._transaction() as db:
            row = db.execute(
                "UPDATE jobs SET status = 'cancelled', finished_at = ?, error_code = 'cancelled',"
                f" error_message = 'cancelled before it finished', {INPUT_DELETED},"
                " expires_at = CASE WHEN batch_id IS NULL THEN ? END"
                " WHERE id = ? AND owner = ? AND status IN ('queued', 'running')"
                " RETURNING batch_id",
                (now, now + self._retention_s, job_id, owner),
            ).fetchone()
            if row is not None and row["batch_id"] is not None:
                self._complete_if_done(row["batch_id"], now)
        return self.get_job(job_id, owner=owner), row is not None

    def cancel_batch(self, batch_id: str, *, owner: str = "") -> tuple[Batch | None, list[str]]:
        """(the batch after, ids of the jobs it cancelled); a finished batch is unchanged."""
        now = self._clock()
        with self._transaction() as db:
            changed = db.execute(
                "UPDATE batches SET cancelled_at = ? WHERE id = ? AND owner = ?"
                " AND completed_at IS NULL AND cancelled_at IS NULL AND expired_at IS NULL",
                (now, batch_id, owner),
            ).rowcount
            cancelled = self._end_lines(batch_id, now, *CANCELLED) if changed else []
        return self.get_batch(batch_id, owner=owner), cancelled

    def expire_batches(self) -> list[str]:
        """Batches whose completion window closed: every line not yet ended ends expired
        (running ones too: their dispatches stop). The ids of the jobs it ended."""
        now = self._clock()
        ended: list[str] = []
        with self._transaction() as db:
            rows = db.execute(
                "UPDATE batches SET expired_at = ? WHERE deadline <= ? AND completed_at IS NULL"
                " AND cancelled_at IS NULL AND expired_at IS NULL RETURNING id",
                (now, now),
            ).fetchall()
            for row in rows:
                ended += self._end_lines(row["id"], now, *EXPIRED)
        return ended

    def _end_lines(self, batch_id: str, now: float, code: str, message: str) -> list[str]:
        """End a batch's queued and running lines with `code` (their inputs deleted)."""
        rows = self._db.execute(
            "UPDATE jobs SET status = 'cancelled', finished_at = ?, error_code = ?,"
            f" error_message = ?, {INPUT_DELETED}"
            " WHERE batch_id = ? AND status IN ('queued', 'running') RETURNING id",
            (now, code, message, batch_id),
        ).fetchall()
        self._complete_if_done(batch_id, now)
        return [row["id"] for row in rows]

    # Reading

    def get_job(self, job_id: str, *, owner: str = "") -> Job | None:
        row = self._db.execute(
            "SELECT * FROM jobs WHERE id = ? AND owner = ?", (job_id, owner)
        ).fetchone()
        return None if row is None else Job(**row)

    def _job(self, job_id: str) -> Job:
        row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        assert row is not None
        return Job(**row)

    def list_jobs(
        self,
        *,
        status: str | None,
        batch_id: str | None,
        after: str | None,
        limit: int,
        owner: str = "",
    ) -> tuple[list[Job], bool]:
        """A page of one owner's jobs, oldest first, and whether more follow."""
        where, args = ["owner = ?"], [owner]
        for column, value in (("status", status), ("batch_id", batch_id)):
            if value is not None:
                where.append(f"{column} = ?")
                args.append(value)
        if after is not None:
            where.append("seq > COALESCE((SELECT seq FROM jobs WHERE id = ? AND owner = ?), -1)")
            args += [after, owner]
        rows = self._db.execute(
            f"SELECT * FROM jobs WHERE {' AND '.join(where)} ORDER BY seq LIMIT ?",
            (*args, limit + 1),
        ).fetchall()
        return [Job(**row) for row in rows[:limit]], len(rows) > limit

    def get_batch(self, batch_id: str, *, owner: str = "") -> Batch | None:
        row = self._db.execute(
            "SELECT * FROM batches WHERE id = ? AND owner = ?", (batch_id, owner)
        ).fetchone()
        if row is None:
            return None
        counts = self._db.execute(
            "SELECT status, COUNT(*) FROM jobs WHERE batch_id = ? GROUP BY status", (batch_id,)
        ).fetchall()
        return Batch(**row, counts={status: n for status, n in counts})

    def list_batches(
        self, *, after: str | None, limit: int, owner: str = ""
    ) -> tuple[list[Batch], bool]:
        rows = self._db.execute(
            "SELECT id FROM batches WHERE owner = ? AND rowid > COALESCE("
            "(SELECT rowid FROM batches WHERE id = ? AND owner = ?), -1) ORDER BY rowid LIMIT ?",
            (owner, after, owner, limit + 1),
        ).fetchall()
        batches = [self.get_batch(row["id"], owner=owner) for row in rows[:limit]]
        return [b for b in batches if b is not None], len(rows) > limit

    def batch_results(
        self, batch_id: str, after_seq: int, limit: int, *, owner: str = "",
        kind: FileKind | None = None,
    ) -> list[Job]:  # fmt: skip
        """Finished lines of a batch in file order, a page at a time (results are streamed):
        all of them, or those of its output file (succeeded) or error file (the rest)."""
        rows = self._db.execute(
            "SELECT * FROM jobs WHERE batch_id = ? AND owner = ? AND seq > ? AND status NOT IN"
            f" ('queued', 'running'){RESULTS_OF[kind]} ORDER BY seq LIMIT ?",
            (batch_id, owner, after_seq, limit),
        ).fetchall()
        return [Job(**row) for row in rows]

    # Files

    def add_file(
        self, content: bytes, filename: str, *, owner: str = "", expires_s: float | None = None
    ) -> StoredFile:
        file_id, now = new_id("file", "-"), self._clock()
        with self._transaction() as db:
            self._admit(owner, 0, len(content))
            db.execute(
                "INSERT INTO files (id, owner, purpose, filename, bytes, created_at, expires_at,"
                " kind, content) VALUES (?, ?, 'batch', ?, ?, ?, ?, 'upload', ?)",
                (
                    file_id,
                    owner,
                    filename,
                    len(content),
                    now,
                    now + (expires_s or self._retention_s),
                    content,
                ),
            )
        found = self.get_file(file_id, owner=owner)
        assert found is not None
        return found

    def get_file(self, file_id: str, *, owner: str = "") -> StoredFile | None:
        row = self._db.execute(
            f"SELECT {FILE_COLUMNS} FROM files WHERE id = ? AND owner = ?", (file_id, owner)
        ).fetchone()
        return None if row is None else StoredFile(**row)

    def file_content(self, file_id: str, *, owner: str = "") -> bytes | None:
        row = self._db.execute(
            "SELECT content FROM files WHERE id = ? AND owner = ? AND kind = 'upload'",
            (file_id, owner),
        ).fetchone()
        return None if row is None else bytes(row["content"])

    def list_files(
        self, *, purpose: str | None, after: str | None, limit: int, newest_first: bool,
        owner: str = "",
    ) -> tuple[list[StoredFile], bool]:  # fmt: skip
        """A page of one owner's files (OpenAI lists the newest first), and whether more follow."""
        where, args = ["owner = ?"], [owner]
        if purpose is not None:
            where.append("purpose = ?")
            args.append(purpose)
        order, beyond = ("DESC", "<") if newest_first else ("ASC", ">")
        if after is not None:
            where.append(
                f"seq {beyond} COALESCE((SELECT seq FROM files WHERE id = ? AND owner = ?),"
                f" {'9e18' if newest_first else '-1'})"
            )
            args += [after, owner]
        rows = self._db.execute(
            f"SELECT {FILE_COLUMNS} FROM files WHERE {' AND '.join(where)}"
            f" ORDER BY seq {order} LIMIT ?",
            (*args, limit + 1),
        ).fetchall()
        return [StoredFile(**row) for row in rows[:limit]], len(rows) > limit

    def counted(self, file_id: str, size: int) -> None:
        """Record an output file's size once its lines were counted."""
        self._db.execute("UPDATE files SET bytes = ? WHERE id = ?", (size, file_id))

    def delete_file(self, file_id: str, *, owner: str = "") -> bool:
        cursor = self._db.execute("DELETE FROM files WHERE id = ? AND owner = ?", (file_id, owner))
        return cursor.rowcount == 1

    # Retention

    def expire(self) -> int:
        """Delete finished jobs and batches past their retention; returns the jobs deleted."""
        now = self._clock()
        with self._transaction() as db:
            deleted = db.execute(
                "DELETE FROM jobs WHERE expires_at <= ? OR batch_id IN"
                " (SELECT id FROM batches WHERE expires_at <= ?)",
                (now, now),
            ).rowcount
            db.execute(
                "DELETE FROM files WHERE expires_at <= ? OR batch_id IN"
                " (SELECT id FROM batches WHERE expires_at <= ?)",
                (now, now),
            )
            db.execute("DELETE FROM batches WHERE expires_at <= ?", (now,))
        return deleted

    def _complete_if_done(self, batch_id: str, now: float) -> None:
        active = self._db.execute(
            "SELECT 1 FROM jobs WHERE batch_id = ? AND status IN ('queued', 'running') LIMIT 1",
            (batch_id,),
        ).fetchone()
        if active is None:
            row = self._db.execute(
                "UPDATE batches SET completed_at = ?, expires_at = ?"
                " WHERE id = ? AND completed_at IS NULL RETURNING owner",
                (now, now + self._retention_s, batch_id),
            ).fetchone()
            if row is not None:
                self._db.executemany(
                    "INSERT INTO files (id, owner, purpose, filename, created_at, expires_at,"
                    " kind, batch_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    output_files(self._lines_of(batch_id), batch_id, row["owner"], now,
                                 now + self._retention_s),
                )  # fmt: skip

    def _lines_of(self, batch_id: str) -> dict[str, int]:
        rows = self._db.execute(
            "SELECT status, count(*) FROM jobs WHERE batch_id = ? GROUP BY status", (batch_id,)
        ).fetchall()
        return {status: n for status, n in rows}

"""Job ownership in the store: every client read and cancel is scoped to the API key's name, and
a store file written before owners existed is migrated when opened (idempotently)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from gateway.jobs.quota import Usage
from gateway.jobs.requests import JobRequest, parse_batch
from gateway.jobs.sqlite import JobStore

# The schema of a store file from before owners (gateway/jobs/sqlite.py as it was).
OLD_SCHEMA = """
CREATE TABLE batches (id TEXT PRIMARY KEY, created_at REAL NOT NULL, total INTEGER NOT NULL,
    cancelled_at REAL, completed_at REAL, expires_at REAL);
CREATE TABLE jobs (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, batch_id TEXT,
    line INTEGER, custom_id TEXT, method TEXT NOT NULL, url TEXT NOT NULL, body TEXT NOT NULL,
    status TEXT NOT NULL, attempt INTEGER NOT NULL DEFAULT 0, created_at REAL NOT NULL,
    started_at REAL, finished_at REAL, expires_at REAL, status_code INTEGER, response TEXT,
    error_code TEXT, error_message TEXT);
CREATE INDEX jobs_by_status ON jobs (status, seq);
INSERT INTO batches (id, created_at, total) VALUES ('batch_old', 1.0, 1);
INSERT INTO jobs (id, batch_id, method, url, body, status, created_at)
    VALUES ('job_old', 'batch_old', 'POST', '/v1/completions', '{}', 'queued', 1.0);
"""
REQUEST = JobRequest(url="/v1/completions", body={"prompt": "a"})
LINE = b'{"custom_id": "a", "url": "/v1/completions", "body": {}}'


def _store(path: Path) -> JobStore:
    return JobStore(path, retention_s=100.0)


def test_reads_lists_and_cancels_are_scoped_to_the_owner(tmp_path: Path) -> None:
    store = _store(tmp_path / "jobs.db")
    job = store.add_job(REQUEST, owner="a")
    batch = store.add_batch(parse_batch(LINE, max_lines=10), owner="a")
    assert store.get_job(job.id, owner="b") is None and store.get_job(job.id) is None
    assert store.get_batch(batch.id, owner="b") is None
    assert store.list_jobs(status=None, batch_id=None, after=None, limit=10, owner="b") == (
        [],
        False,
    )
    assert store.list_batches(after=None, limit=10, owner="b") == ([], False)
    assert store.batch_results(batch.id, 0, 10, owner="b") == []
    assert store.cancel_job(job.id, owner="b") == (None, False)
    assert store.cancel_batch(batch.id, owner="b") == (None, [])
    jobs, _ = store.list_jobs(status=None, batch_id=None, after=None, limit=10, owner="a")
    assert [j.batch_id for j in jobs] == [None, batch.id]  # the job, then the batch's line
    assert all(j.owner == "a" and j.status == "queued" for j in jobs)  # b cancelled nothing
    found = store.get_batch(batch.id, owner="a")
    assert found is not None and found.owner == "a"
    assert store.cancel_job(job.id, owner="a")[1]
    store.close()


def test_a_store_from_before_owners_is_migrated_once(tmp_path: Path) -> None:
    path = tmp_path / "jobs.db"
    with sqlite3.connect(path) as db:
        db.executescript(OLD_SCHEMA)
    for _ in range(2):  # opening again changes nothing
        store = _store(path)
        old = store.get_job("job_old")  # what it had belongs to no key, as it did
        assert old is not None and old.owner == ""
        assert store.usage("") == Usage(lines=1, bytes=2)  # its body's size, counted once
        assert store.get_job("job_old", owner="a") is None
        assert store.get_batch("batch_old") is not None
        claimed = store.claim()  # the scheduler still sees it
        assert claimed is not None and claimed.id == "job_old"
        store.recover()
        assert store.add_job(REQUEST, owner="a").owner == "a"
        store.close()
    with sqlite3.connect(path) as db:
        columns = {row[1] for row in db.execute("PRAGMA table_info(jobs)")}
        indexes = {row[1] for row in db.execute("PRAGMA index_list(jobs)")}
    assert {"owner", "size"} <= columns and {"jobs_by_owner", "jobs_usage"} <= indexes

"""The job store: exactly one result per job, recovery after a crash, retention on a fake
clock. A real SQLite file in WAL mode; nothing mocked."""

from __future__ import annotations

import sqlite3
from dataclasses import replace
from pathlib import Path

import pytest

from gateway.jobs.model import Outcome
from gateway.jobs.requests import JobRequest, parse_batch
from gateway.jobs.sqlite import JobStore

RETENTION_S = 100.0
OK = Outcome("succeeded", status_code=200, response='{"text": "hi"}')


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(tmp_path: Path, clock: Clock) -> JobStore:
    return JobStore(tmp_path / "jobs.db", retention_s=RETENTION_S, clock=clock)


def _request(custom_id: str | None = None) -> JobRequest:
    return JobRequest(custom_id=custom_id, url="/v1/completions", body={"prompt": "a"})


def _batch_file(n: int) -> bytes:
    lines = [
        f'{{"custom_id": "c{i}", "url": "/v1/completions", "body": {{"prompt": "p{i}"}}}}'
        for i in range(n)
    ]
    return "\n".join(lines).encode()


def test_store_is_in_wal_mode(store: JobStore, tmp_path: Path) -> None:
    with sqlite3.connect(tmp_path / "jobs.db") as db:
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)


def test_jobs_are_claimed_oldest_first_with_a_new_attempt_each_time(store: JobStore) -> None:
    first, second = store.add_job(_request("a")), store.add_job(_request("b"))
    claimed = store.claim()
    assert claimed is not None and (claimed.id, claimed.attempt) == (first.id, 1)
    assert claimed.status == "running"
    assert store.requeue(claimed)
    again = store.claim()
    assert again is not None and (again.id, again.attempt) == (first.id, 2)
    third = store.claim()
    assert third is not None and third.id == second.id
    assert store.claim() is None


def test_a_result_is_recorded_once_and_a_stale_attempt_cannot_overwrite_it(
    store: JobStore,
) -> None:
    store.add_job(_request())
    old = store.claim()
    assert old is not None and store.requeue(old)
    new = store.claim()
    assert new is not None
    assert not store.finish(old, Outcome("failed", error_code="x", error_message="stale"))
    assert store.finish(new, OK)
    assert not store.finish(new, Outcome("failed", error_code="x", error_message="twice"))
    job = store.get_job(new.id)
    assert job is not None and job.status == "succeeded"
    assert job.result_json()["response"] == {"status_code": 200, "body": {"text": "hi"}}


def test_a_job_that_keeps_crashing_the_gateway_fails_at_its_last_attempt(
    tmp_path: Path, clock: Clock
) -> None:
    store = JobStore(tmp_path / "jobs.db", retention_s=RETENTION_S, clock=clock)
    (batch_line,) = parse_batch(_batch_file(1), max_lines=10)
    batch = store.add_batch([batch_line])
    outcomes = []
    for _ in range(3):  # claimed, then the gateway dies during the attempt, three times
        assert store.claim() is not None
        store.close()
        store = JobStore(tmp_path / "jobs.db", retention_s=RETENTION_S, clock=clock)
        outcomes.append(store.recover(max_attempts=3))
    assert outcomes == [(1, 0), (1, 0), (0, 1)]
    assert store.claim() is None  # not run a fourth time
    (job,) = store.batch_results(batch.id, after_seq=0, limit=10)
    assert job.status == "failed" and job.error_code == "attempts_exhausted"
    assert job.error_message == "the gateway stopped during attempt 3 of 3; not run again"
    done = store.get_batch(batch.id)
    assert done is not None and done.status == "completed"


def test_recovery_requeues_running_jobs_and_fences_the_old_attempt(
    tmp_path: Path, clock: Clock
) -> None:
    store = JobStore(tmp_path / "jobs.db", retention_s=RETENTION_S, clock=clock)
    for i in range(3):
        store.add_job(_request(str(i)))
    running = [store.claim(), store.claim()]
    store.close()  # the gateway died with two jobs running
    store = JobStore(tmp_path / "jobs.db", retention_s=RETENTION_S, clock=clock)
    assert store.recover(max_attempts=3) == (2, 0)
    assert [j.status for j in store.list_jobs(status=None, batch_id=None, after=None,
                                              limit=10)[0]] == ["queued"] * 3  # fmt: skip
    claimed = store.claim()
    assert claimed is not None and claimed.attempt == 2
    stale = running[0]
    assert stale is not None and stale.id == claimed.id
    assert not store.finish(stale, OK)  # a late answer from before the crash is ignored
    assert store.finish(claimed, OK)


def test_cancel_only_active_jobs(store: JobStore) -> None:
    queued = store.add_job(_request())
    job, cancelled = store.cancel_job(queued.id)
    assert cancelled and job is not None and job.status == "cancelled"
    assert store.cancel_job(queued.id)[1] is False  # already finished
    assert store.cancel_job("job_unknown") == (None, False)
    store.add_job(_request())
    running = store.claim()
    assert running is not None
    assert store.cancel_job(running.id)[1]
    assert not store.finish(running, OK)  # the cancel owns the result


def test_batch_counts_bad_lines_fail_at_once_and_the_rest_run(store: JobStore) -> None:
    data = _batch_file(3) + b"\n{not json\n" + b'{"custom_id": "c0", "url": "/x", "body": {}}\n'
    batch = store.add_batch(parse_batch(data, max_lines=10))
    assert batch.total == 5 and batch.status == "in_progress"
    assert batch.as_json()["request_counts"] == {
        "total": 5, "completed": 0, "failed": 2, "queued": 3, "running": 0,
    }  # fmt: skip
    while (job := store.claim()) is not None:
        assert store.finish(job, OK)
    done = store.get_batch(batch.id)
    assert done is not None and done.status == "completed"
    assert done.expires_at == done.completed_at + RETENTION_S  # type: ignore[operator]
    lines = [job.result_json() for job in store.batch_results(batch.id, 0, 100)]
    assert [line["custom_id"] for line in lines] == ["c0", "c1", "c2", None, "c0"]
    assert lines[3]["error"]["message"].startswith("line 4: not valid JSON")
    assert "also on line 1" in lines[4]["error"]["message"]


def test_cancelling_a_batch_cancels_its_active_lines(store: JobStore) -> None:
    batch = store.add_batch(parse_batch(_batch_file(4), max_lines=10))
    first = store.claim()
    assert first is not None and store.finish(first, OK)
    running = store.claim()
    after, cancelled = store.cancel_batch(batch.id)
    assert after is not None and after.status == "cancelled"
    assert running is not None and running.id in cancelled and len(cancelled) == 3
    counts = after.as_json()["request_counts"]
    assert (counts["completed"], counts["failed"]) == (1, 3)
    assert store.claim() is None


def test_finished_jobs_and_batches_expire_after_the_retention(
    store: JobStore, clock: Clock
) -> None:
    job = store.add_job(_request())
    waiting = store.add_job(_request())
    batch = store.add_batch(parse_batch(_batch_file(2), max_lines=10))
    claimed = store.claim()
    assert claimed is not None and claimed.id == job.id and store.finish(claimed, OK)
    for _ in range(3):
        store.claim()  # `waiting` stays running: never expires
    for line in store.list_jobs(status="running", batch_id=batch.id, after=None, limit=10)[0]:
        assert store.finish(line, OK)
    clock.now += RETENTION_S - 1
    assert store.expire() == 0
    clock.now += 2
    assert store.expire() == 3  # the finished job and both batch lines
    assert store.get_job(job.id) is None and store.get_batch(batch.id) is None
    assert store.get_job(waiting.id) is not None


def test_listing_filters_by_status_and_pages(store: JobStore) -> None:
    ids = [store.add_job(_request(str(i))).id for i in range(5)]
    store.claim()
    page, more = store.list_jobs(status="queued", batch_id=None, after=None, limit=2)
    assert [j.id for j in page] == ids[1:3] and more
    page, more = store.list_jobs(status="queued", batch_id=None, after=ids[2], limit=2)
    assert [j.id for j in page] == ids[3:5] and not more


def test_where_an_attempt_went_is_kept_across_a_restart_and_cleared_by_a_retry(
    tmp_path: Path, clock: Clock
) -> None:
    store = JobStore(tmp_path / "jobs.db", retention_s=RETENTION_S, clock=clock)
    first, second = store.add_job(_request("a")), store.add_job(_request("b"))
    for job in (store.claim(), store.claim()):
        assert job is not None and store.sent(job, f"http://{job.custom_id}") == "sent"
    failed = store.get_job(second.id)
    assert failed is not None and failed.replica == "http://b" and store.requeue(failed)
    store.close()  # the gateway stops with `first` sent to a
    store = JobStore(tmp_path / "jobs.db", retention_s=RETENTION_S, clock=clock)
    assert store.recover(max_attempts=3) == (1, 0)
    again = [store.claim(), store.claim()]
    assert [(j.id, j.replica) for j in again if j] == [(first.id, "http://a"), (second.id, None)]
    assert again[0] is not None
    assert store.sent(replace(again[0], attempt=1), "http://a") == "gone"  # an old attempt

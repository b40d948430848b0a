"""The PostgreSQL job store as several gateways use it, on a real server: each `PostgresStore`
here is one gateway's (its own pool and holder id) on one shared database. Claims never
overlap, leases run out only when their gateway stops renewing, results stay fenced by
attempt, and `max_attempts` holds across crashes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack

import asyncpg
import pytest

from gateway.jobs.model import Job, Outcome
from gateway.jobs.postgres import MIGRATIONS, PostgresStore
from gateway.jobs.requests import JobRequest, parse_batch
from gateway.jobs.store import StoreUnavailable
from loadtests.harness.pgserver import PostgresServer, fresh_database

OK = Outcome("succeeded", status_code=200, response='{"text": "hi"}')
LEASE_S = 1.0  # short, so a "dead" gateway's claims run out within a test

Open = Callable[..., Awaitable[PostgresStore]]


@pytest.fixture
async def gateways(postgres_url: str) -> AsyncIterator[Open]:
    """Opens stores on one database, as gateways starting up would; closes them after."""
    async with AsyncExitStack() as stack:

        async def open_store(lease_s: float = LEASE_S) -> PostgresStore:
            store = await PostgresStore.open(postgres_url, retention_s=100, lease_s=lease_s)
            stack.push_async_callback(store.close)
            return store

        yield open_store


def _request(custom_id: str) -> JobRequest:
    return JobRequest(custom_id=custom_id, url="/v1/completions", body={"prompt": custom_id})


def _lines(n: int) -> bytes:
    return "\n".join(
        f'{{"custom_id": "c{i}", "url": "/v1/completions", "body": {{"prompt": "p{i}"}}}}'
        for i in range(n)
    ).encode()


async def test_gateways_starting_together_create_the_schema_once(postgres_url: str) -> None:
    stores = await asyncio.gather(
        *(PostgresStore.open(postgres_url, retention_s=1, lease_s=1) for _ in range(4))
    )
    try:
        db = await asyncpg.connect(postgres_url)
        try:
            versions = await db.fetch("SELECT version FROM infergate_schema ORDER BY version")
            assert [r["version"] for r in versions] == list(range(1, len(MIGRATIONS) + 1))
            await db.execute("INSERT INTO infergate_schema (version) VALUES (99)")
        finally:
            await db.close()
        with pytest.raises(RuntimeError, match="version 99, newer than this gateway's"):
            await PostgresStore.open(postgres_url, retention_s=1, lease_s=1)
    finally:
        for store in stores:
            await store.close()


async def test_two_gateways_claiming_at_once_never_take_the_same_job(gateways: Open) -> None:
    a, b = await gateways(), await gateways()
    added = {(await a.add_job(_request(str(i)))).id for i in range(300)}
    taken: dict[str, list[str]] = {a.holder: [], b.holder: []}

    async def claimer(store: PostgresStore) -> None:
        while (job := await store.claim()) is not None:
            assert job.attempt == 1
            taken[store.holder].append(job.id)

    await asyncio.gather(*(claimer(store) for store in (a, b) for _ in range(6)))
    every = taken[a.holder] + taken[b.holder]
    assert len(every) == len(set(every)) == 300 and set(every) == added
    assert taken[a.holder] and taken[b.holder]  # both took part
    assert await a.renew(taken[a.holder] + taken[b.holder]) == set(taken[a.holder])


async def test_a_dead_gateways_claims_run_out_and_its_late_results_are_dropped(
    gateways: Open,
) -> None:
    dead, alive = await gateways(), await gateways()
    for i in range(3):
        await dead.add_job(_request(str(i)))
    claimed = [await dead.claim(), await dead.claim()]
    assert await alive.recover(max_attempts=3) == (0, 0)  # the leases still run
    await asyncio.sleep(LEASE_S / 2)
    assert await dead.renew([j.id for j in claimed if j]) == {j.id for j in claimed if j}
    await asyncio.sleep(LEASE_S / 2 + 0.1)
    assert await alive.recover(max_attempts=3) == (0, 0)  # renewed: still alive then
    await asyncio.sleep(LEASE_S + 0.1)  # now it stops renewing (killed)
    assert await alive.recover(max_attempts=3) == (2, 0)
    again = [await alive.claim() for _ in range(3)]
    assert [j.attempt for j in again if j] == [2, 2, 1]
    stale = claimed[0]
    assert stale is not None and again[0] is not None and again[0].id == stale.id
    assert not await dead.finish(stale, OK)  # the old attempt's answer is not recorded
    assert not await dead.requeue(stale) and not await dead.unclaim(stale)
    assert await dead.renew([stale.id]) == set()  # and the old gateway is told it lost it
    assert await alive.finish(again[0], OK)
    job = await dead.get_job(stale.id)
    assert job is not None and job.status == "succeeded" and job.attempt == 2


async def test_max_attempts_hold_across_crashes(gateways: Open) -> None:
    store = await gateways()
    batch = await store.add_batch(parse_batch(_lines(1), max_lines=10))
    outcomes = []
    for _ in range(3):  # claimed, then its gateway dies during the attempt, three times
        claimant = await gateways()
        assert await claimant.claim() is not None
        await asyncio.sleep(LEASE_S + 0.1)
        outcomes.append(await store.recover(max_attempts=3))
    assert outcomes == [(1, 0), (1, 0), (0, 1)]
    assert await store.claim() is None  # not run a fourth time
    (job,) = await store.batch_results(batch.id, 0, 10)
    assert job.status == "failed" and job.error_code == "attempts_exhausted"
    assert (
        job.error_message == "the gateway running it stopped during attempt 3 of 3; not run again"
    )
    done = await store.get_batch(batch.id)
    assert done is not None and done.status == "completed"


async def test_a_cancel_at_one_gateway_stops_the_run_at_the_other(gateways: Open) -> None:
    runner, other = await gateways(), await gateways()
    job = await other.add_job(_request("x"), owner="team-a")
    running = await runner.claim()
    assert running is not None and running.id == job.id
    assert await other.cancel_job(job.id) == (None, False)  # another owner's: not found
    after, cancelled = await other.cancel_job(job.id, owner="team-a")
    assert cancelled and after is not None and after.status == "cancelled"
    assert await runner.renew([job.id]) == set()  # the runner stops it at its next renewal
    assert not await runner.finish(running, OK)


async def test_the_last_lines_ending_at_two_gateways_at_once_complete_the_batch(
    gateways: Open,
) -> None:
    a, b = await gateways(), await gateways()
    for _ in range(10):
        batch = await a.add_batch(parse_batch(_lines(2), max_lines=10))
        first, second = await a.claim(), await b.claim()
        assert first is not None and second is not None
        assert await asyncio.gather(a.finish(first, OK), b.finish(second, OK)) == [True, True]
        done = await b.get_batch(batch.id)
        assert done is not None and done.status == "completed", done
        assert done.as_json()["request_counts"]["completed"] == 2


async def test_a_batch_reads_the_same_from_every_gateway(gateways: Open) -> None:
    a, b = await gateways(), await gateways()
    batch = await a.add_batch(parse_batch(_lines(5) + b"\n{bad", max_lines=10), owner="k")
    job = await b.claim()
    assert job is not None and await b.finish(job, OK)
    views = [await s.get_batch(batch.id, owner="k") for s in (a, b)]
    assert views[0] == views[1] and views[0] is not None
    assert views[0].as_json()["request_counts"] == {
        "total": 6, "completed": 1, "failed": 1, "queued": 4, "running": 0,
    }  # fmt: skip
    assert await a.get_batch(batch.id) is None  # scoped to its owner
    listed, more = await b.list_batches(after=None, limit=10, owner="k")
    assert [x.id for x in listed] == [batch.id] and not more
    results = await a.batch_results(batch.id, 0, 10, owner="k")
    assert [r.custom_id for r in results] == ["c0", None]


async def test_a_gateway_stopping_hands_its_running_jobs_back(gateways: Open) -> None:
    leaving, staying = await gateways(), await gateways()
    for i in range(3):
        await staying.add_job(_request(str(i)))
    for _ in range(2):
        assert await leaving.claim() is not None
    assert await leaving.release() == 2
    jobs, _ = await staying.list_jobs(status="queued", batch_id=None, after=None, limit=10)
    assert len(jobs) == 3
    again = await staying.claim()
    assert again is not None and again.attempt == 2


async def test_a_database_that_goes_away_is_a_store_unavailable_then_comes_back(
    stoppable_postgres_server: PostgresServer,
) -> None:
    server = stoppable_postgres_server
    url = await fresh_database(server)
    store = await PostgresStore.open(url, retention_s=1, lease_s=1, timeout_s=2)
    try:
        await _outage(server, store)
    finally:
        await store.close()


async def _outage(server: PostgresServer, store: PostgresStore) -> None:
    job = await store.add_job(_request("x"))
    await asyncio.to_thread(server.stop)
    with pytest.raises(StoreUnavailable, match="cannot be reached now"):
        await store.get_job(job.id)
    with pytest.raises(StoreUnavailable):
        await store.claim()
    await asyncio.to_thread(server.start)
    claimed: Job | None = None
    for _ in range(50):  # the pool reconnects on its own
        try:
            claimed = await store.claim()
            break
        except StoreUnavailable:
            await asyncio.sleep(0.1)
    assert claimed is not None and claimed.id == job.id
    assert await store.finish(claimed, OK)


async def test_a_database_from_an_older_gateway_is_migrated_in_place(postgres_url: str) -> None:
    db = await asyncpg.connect(postgres_url)
    try:
        async with db.transaction():  # what the first schema version left
            await db.execute(MIGRATIONS[0])
            await db.execute("CREATE TABLE infergate_schema (version integer NOT NULL)")
            await db.execute("INSERT INTO infergate_schema (version) VALUES (1)")
            await db.execute(
                "INSERT INTO jobs (id, method, url, body, status, created_at)"
                " VALUES ('job_old', 'POST', '/v1/completions', '{}', 'queued', 1)"
            )
    finally:
        await db.close()
    store = await PostgresStore.open(postgres_url, retention_s=1, lease_s=1)
    try:
        old = await store.claim()
        assert old is not None and old.id == "job_old" and old.replica is None
        assert await store.sent(old, "http://127.0.0.1:9001", limit=1) == "sent"
    finally:
        await store.close()


async def test_where_an_attempt_went_is_kept_for_a_rerun_after_a_crash_only(
    gateways: Open,
) -> None:
    dead, alive = await gateways(), await gateways()
    for i in range(2):
        await alive.add_job(_request(str(i)))
    crashed, failed = await dead.claim(), await alive.claim()
    assert crashed is not None and failed is not None
    assert [await dead.sent(crashed, "http://r1"), await alive.sent(failed, "http://r2")] == [
        "sent", "sent",
    ]  # fmt: skip
    assert await alive.requeue(failed)  # r2 answered with an error: the next try goes anywhere
    await asyncio.sleep(LEASE_S + 0.1)
    assert await alive.recover(max_attempts=3) == (1, 0)
    again = [await alive.claim(), await alive.claim()]
    assert [(j.id, j.attempt, j.replica) for j in again if j] == [
        (crashed.id, 2, "http://r1"),  # back to where it may have finished
        (failed.id, 2, None),
    ]
    assert await dead.sent(crashed, "http://r1") == "gone"  # the stale attempt may not be sent
    job = again[0]
    assert job is not None
    await alive.cancel_job(job.id)
    assert await alive.sent(job, "http://r1") == "gone"  # nor a cancelled one


async def test_a_replicas_job_slots_are_counted_over_every_gateway(gateways: Open) -> None:
    a, b = await gateways(), await gateways()
    for i in range(40):
        await a.add_job(_request(str(i)))
    claimed = [job for store in (a, b) for _ in range(20) if (job := await store.claim())]
    owner = {job.id: (a if i < 20 else b) for i, job in enumerate(claimed)}
    # Every job at once for the same replica, 3 slots: exactly 3 get them, whichever gateway.
    sending = await asyncio.gather(
        *(owner[job.id].sent(job, "http://r", limit=3) for job in claimed)
    )
    assert sending.count("sent") == 3 and sending.count("full") == 37
    sent = [job for job, s in zip(claimed, sending, strict=True) if s == "sent"]
    assert await owner[sent[0].id].finish(sent[0], OK)  # a slot frees
    waiting = next(job for job, s in zip(claimed, sending, strict=True) if s == "full")
    assert await owner[waiting.id].sent(waiting, "http://r", limit=3) == "sent"
    assert await owner[waiting.id].sent(waiting, "http://other", limit=3) == "sent"  # moved
    assert await a.sent(claimed[-1], "http://r", limit=None) == "sent"  # a re-run: no cap

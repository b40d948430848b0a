"""Each key's storage quota in the job store, the same on SQLite and a real PostgreSQL server:
input and result bytes and lines are counted per key, a submit past either is refused whole
with what is left, a cancel deletes the inputs it stops at once, and submits racing each other
(on PostgreSQL from two gateways) never take the key past its quota."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from gateway.jobs.model import Outcome
from gateway.jobs.postgres import PostgresStore
from gateway.jobs.quota import Quota, QuotaExceeded, Usage
from gateway.jobs.requests import BatchLine, JobRequest
from gateway.jobs.store import SqliteStore, Store

Open = Callable[[Quota], Awaitable[Store]]
BODY = {"pad": "x" * 90}  # 100 bytes as stored: {"pad":"xxx…"}


@pytest.fixture
async def open_store(store: str) -> AsyncIterator[Open]:
    """Stores on the test's jobs.store (a second one on PostgreSQL is another gateway)."""
    opened: list[Store] = []

    async def open_(quota: Quota) -> Store:
        if store.startswith("postgresql"):
            opened.append(await PostgresStore.open(store, retention_s=60, lease_s=5, quota=quota))
        else:
            opened.append(await SqliteStore.open(Path(store), retention_s=60, quota=quota))
        return opened[-1]

    yield open_
    for each in opened:
        await each.close()


def _request(custom_id: str = "c") -> JobRequest:
    return JobRequest(custom_id=custom_id, url="/v1/completions", body=BODY)


def _lines(n: int) -> list[BatchLine]:
    return [BatchLine(i + 1, f"c{i}", request=_request(f"c{i}")) for i in range(n)]


async def test_bytes_and_lines_are_counted_per_key_and_a_submit_past_them_is_refused(
    open_store: Open,
) -> None:
    store = await open_store(Quota(max_bytes=1000, max_lines=6))
    await store.add_batch(_lines(4), owner="a")
    assert await store.usage("a") == Usage(lines=4, bytes=400)
    with pytest.raises(QuotaExceeded) as refused:
        await store.add_batch(_lines(3), owner="a")
    assert "600 bytes and 2 lines left" in str(refused.value)
    assert (await store.add_batch(_lines(3), owner="b")).total == 3  # another key's own share
    await store.add_job(_request(), owner="a")
    claimed = await store.claim()  # the oldest: a line of a's batch
    assert claimed is not None and claimed.owner == "a"
    answer = '{"text": "' + "y" * 488 + '"}'  # a 500-byte result counts too
    assert await store.finish(claimed, Outcome("succeeded", status_code=200, response=answer))
    assert await store.usage("a") == Usage(lines=5, bytes=1000)
    with pytest.raises(QuotaExceeded, match="0 bytes and 1 lines left"):
        await store.add_job(_request(), owner="a")


async def test_a_cancel_deletes_the_inputs_it_stops_and_gives_their_share_back(
    open_store: Open,
) -> None:
    store = await open_store(Quota(max_bytes=500, max_lines=5))
    batch = await store.add_batch(_lines(5), owner="a")
    running = await store.claim()
    assert running is not None
    job = await store.add_job(_request(), owner="b")
    _, cancelled = await store.cancel_batch(batch.id, owner="a")
    assert len(cancelled) == 5
    assert await store.usage("a") == Usage(lines=0, bytes=0)
    page, _ = await store.list_jobs(status=None, batch_id=batch.id, after=None, limit=10, owner="a")
    assert {j.body for j in page} == {""} and {j.status for j in page} == {"cancelled"}
    assert not await store.finish(running, Outcome("succeeded", status_code=200, response="{}"))
    await store.add_batch(_lines(5), owner="a")  # the whole quota again
    done, was_cancelled = await store.cancel_job(job.id, owner="b")
    assert was_cancelled and done is not None and done.body == ""
    assert await store.usage("b") == Usage(lines=0, bytes=0)


async def test_submits_racing_each_other_never_pass_the_quota(open_store: Open) -> None:
    quota = Quota(max_bytes=None, max_lines=10)
    first = await open_store(quota)
    # A second gateway on PostgreSQL; SQLite has one gateway, so the same store twice.
    second = await open_store(quota) if isinstance(first, PostgresStore) else first

    async def submit(store: Store) -> bool:
        try:
            await store.add_batch(_lines(3), owner="a")
        except QuotaExceeded:
            return False
        return True

    taken = await asyncio.gather(*(submit(s) for s in [first, second] * 4))
    assert sum(taken) == 3
    assert await first.usage("a") == Usage(lines=9, bytes=900)

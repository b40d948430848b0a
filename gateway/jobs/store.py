"""The job store's contract (`Store`, every call awaited) and its SQLite implementation
`SqliteStore`, which runs gateway/jobs/sqlite.py's synchronous JobStore on one dedicated thread
so the event loop never waits on disk. gateway/jobs/postgres.py is the other implementation."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Concatenate, ParamSpec, Protocol, TypeVar

from gateway.errors import GatewayError
from gateway.jobs.model import Batch, BatchSpec, FileKind, Job, Outcome, Sending, StoredFile
from gateway.jobs.quota import UNLIMITED, Quota, Usage
from gateway.jobs.requests import BatchLine, JobRequest
from gateway.jobs.sqlite import JobStore


class StoreUnavailable(GatewayError):
    """The job store cannot be reached now (a shared database down or refusing): 503."""

    status = 503
    error_type = "job_store_unavailable"


class Store(Protocol):
    """What the gateway asks of a job store, every call awaited: `SqliteStore` (one gateway,
    a file) and `PostgresStore` (gateway/jobs/postgres.py: several gateways, one database)."""

    shared: bool  # several gateways may use it at once (claims carry a lease)

    async def add_job(self, request: JobRequest, *, owner: str = "") -> Job: ...
    async def add_batch(
        self, lines: Sequence[BatchLine], *, owner: str = "", spec: BatchSpec | None = None
    ) -> Batch: ...
    async def usage(self, owner: str) -> Usage:
        """What `owner`'s jobs keep in the store (the lines and bytes its quota bounds)."""
        ...

    async def claim(self, passed_over: Sequence[str] = ()) -> Job | None: ...
    async def unclaim(self, job: Job) -> bool: ...
    async def sent(self, job: Job, replica: str, limit: int | None = None) -> Sending:
        """Record where this attempt goes; with `limit`, only while fewer jobs (of every
        gateway on the store) run there."""

    async def finish(self, job: Job, outcome: Outcome) -> bool: ...
    async def requeue(self, job: Job) -> bool: ...

    async def recover(self, max_attempts: int | None) -> tuple[int, int]:
        """Jobs whose gateway stopped while running them: (queued again, failed)."""
        ...

    async def renew(self, job_ids: Collection[str]) -> set[str]:
        """Extend this gateway's leases on these running jobs (those it is dispatching); the
        ids it still holds (not cancelled, not taken over elsewhere)."""
        ...

    async def release(self) -> int:
        """This gateway stops: its running jobs (dispatches cancelled) go back to the queue."""
        ...

    async def cancel_job(self, job_id: str, *, owner: str = "") -> tuple[Job | None, bool]: ...
    async def cancel_batch(
        self, batch_id: str, *, owner: str = ""
    ) -> tuple[Batch | None, list[str]]: ...
    async def get_job(self, job_id: str, *, owner: str = "") -> Job | None: ...
    async def list_jobs(
        self, *, status: str | None, batch_id: str | None, after: str | None, limit: int,
        owner: str = "",
    ) -> tuple[list[Job], bool]: ...  # fmt: skip
    async def get_batch(self, batch_id: str, *, owner: str = "") -> Batch | None: ...
    async def list_batches(
        self, *, after: str | None, limit: int, owner: str = ""
    ) -> tuple[list[Batch], bool]: ...
    async def batch_results(
        self, batch_id: str, after_seq: int, limit: int, *, owner: str = "",
        kind: FileKind | None = None,
    ) -> list[Job]: ...  # fmt: skip
    async def expire_batches(self) -> list[str]:
        """End the lines of batches whose completion window closed; the job ids it ended."""
        ...

    async def add_file(
        self, content: bytes, filename: str, *, owner: str = "", expires_s: float | None = None
    ) -> StoredFile: ...
    async def get_file(self, file_id: str, *, owner: str = "") -> StoredFile | None: ...
    async def file_content(self, file_id: str, *, owner: str = "") -> bytes | None: ...
    async def list_files(
        self, *, purpose: str | None, after: str | None, limit: int, newest_first: bool,
        owner: str = "",
    ) -> tuple[list[StoredFile], bool]: ...  # fmt: skip
    async def counted(self, file_id: str, size: int) -> None: ...
    async def delete_file(self, file_id: str, *, owner: str = "") -> bool: ...
    async def expire(self) -> int: ...
    async def close(self) -> None: ...


P = ParamSpec("P")
T = TypeVar("T")


class SqliteStore:
    """The SQLite JobStore behind the async `Store` calls: every call runs on one dedicated
    thread (SQLite connections belong to the thread that opened them; one thread also
    serialises writes without lock waits). One gateway at a time (gateway/jobs/service.py
    holds a file lock), so a stopped gateway's running jobs are all recoverable at start."""

    shared = False

    def __init__(self, executor: ThreadPoolExecutor, store: JobStore) -> None:
        self._executor = executor
        self._store = store

    @classmethod
    async def open(
        cls, path: str | Path, *, retention_s: float, quota: Quota = UNLIMITED
    ) -> SqliteStore:
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="job-store")
        loop = asyncio.get_running_loop()
        try:
            store = await loop.run_in_executor(
                executor, functools.partial(JobStore, path, retention_s=retention_s, quota=quota)
            )
        except BaseException:
            executor.shutdown(wait=False)
            raise
        return cls(executor, store)

    async def run(
        self, method: Callable[Concatenate[JobStore, P], T], *args: P.args, **kwargs: P.kwargs
    ) -> T:
        call = functools.partial(method, self._store, *args, **kwargs)
        return await asyncio.get_running_loop().run_in_executor(self._executor, call)

    async def add_job(self, request: JobRequest, *, owner: str = "") -> Job:
        return await self.run(JobStore.add_job, request, owner=owner)

    async def add_batch(
        self, lines: Sequence[BatchLine], *, owner: str = "", spec: BatchSpec | None = None
    ) -> Batch:
        return await self.run(JobStore.add_batch, lines, owner=owner, spec=spec)

    async def usage(self, owner: str) -> Usage:
        return await self.run(JobStore.usage, owner)

    async def claim(self, passed_over: Sequence[str] = ()) -> Job | None:
        return await self.run(JobStore.claim, passed_over)

    async def unclaim(self, job: Job) -> bool:
        return await self.run(JobStore.unclaim, job)

    async def sent(self, job: Job, replica: str, limit: int | None = None) -> Sending:
        return await self.run(JobStore.sent, job, replica, limit)

    async def finish(self, job: Job, outcome: Outcome) -> bool:
        return await self.run(JobStore.finish, job, outcome)

    async def requeue(self, job: Job) -> bool:
        return await self.run(JobStore.requeue, job)

    async def recover(self, max_attempts: int | None) -> tuple[int, int]:
        return await self.run(JobStore.recover, max_attempts)

    async def renew(self, job_ids: Collection[str]) -> set[str]:
        return set(job_ids)  # no lease: the file lock is this gateway's claim on all of them

    async def release(self) -> int:
        queued, _ = await self.run(JobStore.recover)
        return queued

    async def cancel_job(self, job_id: str, *, owner: str = "") -> tuple[Job | None, bool]:
        return await self.run(JobStore.cancel_job, job_id, owner=owner)

    async def cancel_batch(
        self, batch_id: str, *, owner: str = ""
    ) -> tuple[Batch | None, list[str]]:
        return await self.run(JobStore.cancel_batch, batch_id, owner=owner)

    async def get_job(self, job_id: str, *, owner: str = "") -> Job | None:
        return await self.run(JobStore.get_job, job_id, owner=owner)

    async def list_jobs(
        self, *, status: str | None, batch_id: str | None, after: str | None, limit: int,
        owner: str = "",
    ) -> tuple[list[Job], bool]:  # fmt: skip
        return await self.run(
            JobStore.list_jobs, status=status, batch_id=batch_id, after=after, limit=limit,
            owner=owner,
        )  # fmt: skip

    async def get_batch(self, batch_id: str, *, owner: str = "") -> Batch | None:
        return await self.run(JobStore.get_batch, batch_id, owner=owner)

    async def list_batches(
        self, *, after: str | None, limit: int, owner: str = ""
    ) -> tuple[list[Batch], bool]:
        return await self.run(JobStore.list_batches, after=after, limit=limit, owner=owner)

    async def batch_results(
        self, batch_id: str, after_seq: int, limit: int, *, owner: str = "",
        kind: FileKind | None = None,
    ) -> list[Job]:  # fmt: skip
        return await self.run(
            JobStore.batch_results, batch_id, after_seq, limit, owner=owner, kind=kind
        )

    async def expire_batches(self) -> list[str]:
        return await self.run(JobStore.expire_batches)

    async def add_file(
        self, content: bytes, filename: str, *, owner: str = "", expires_s: float | None = None
    ) -> StoredFile:
        return await self.run(
            JobStore.add_file, content, filename, owner=owner, expires_s=expires_s
        )

    async def get_file(self, file_id: str, *, owner: str = "") -> StoredFile | None:
        return await self.run(JobStore.get_file, file_id, owner=owner)

    async def file_content(self, file_id: str, *, owner: str = "") -> bytes | None:
        return await self.run(JobStore.file_content, file_id, owner=owner)

    async def list_files(
        self, *, purpose: str | None, after: str | None, limit: int, newest_first: bool,
        owner: str = "",
    ) -> tuple[list[StoredFile], bool]:  # fmt: skip
        return await self.run(
            JobStore.list_files, purpose=purpose, after=after, limit=limit,
            newest_first=newest_first, owner=owner,
        )  # fmt: skip

    async def counted(self, file_id: str, size: int) -> None:
        await self.run(JobStore.counted, file_id, size)

    async def delete_file(self, file_id: str, *, owner: str = "") -> bool:
        return await self.run(JobStore.delete_file, file_id, owner=owner)

    async def expire(self) -> int:
        return await self.run(JobStore.expire)

    async def close(self) -> None:
        await self.run(JobStore.close)
        self._executor.shutdown(wait=True)

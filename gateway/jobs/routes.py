"""HTTP endpoints for deferred inference: /v1/jobs (one request) and /v1/batches (a JSONL
file, OpenAI Batch style). Handlers validate and orchestrate; the store owns the state.

With no `jobs:` section in the config every endpoint answers 404 saying how to turn jobs on.
Jobs and batches belong to the API key that submitted them (`auth.key_name`, '' without auth):
every read, listing and cancel is scoped to it, so another key's job is a 404 like an unknown id.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from gateway.datapath.auth import key_name
from gateway.datapath.body import read_body
from gateway.errors import BodyTooLarge, Conflict, InvalidRequest, NotFound
from gateway.jobs.model import JOB_STATUSES, Batch, Job
from gateway.jobs.requests import parse_batch, parse_job_body
from gateway.jobs.service import JOBS, JobService

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
MAX_PAGE = 1000
RESULTS_PAGE = 1000
FORM_TYPES = frozenset({"multipart/form-data", "application/x-www-form-urlencoded"})
# ASCII digits only: str.isdigit also takes '²' and other scripts' digits, which int() refuses.
PAGE_SIZE = re.compile(r"[0-9]{1,9}")


def _service(request: web.Request) -> JobService:
    service = request.app.get(JOBS)
    if service is None:
        raise NotFound(
            "deferred jobs are off: add a 'jobs:' section with a 'store:' (an SQLite file path "
            "or a postgresql:// URL) to the gateway config and restart it"
        )
    return service


def _limit(request: web.Request) -> int:
    raw = request.query.get("limit", "100")
    if not PAGE_SIZE.fullmatch(raw) or not 1 <= int(raw) <= MAX_PAGE:
        raise InvalidRequest(f"limit: expected an integer from 1 to {MAX_PAGE} (got {raw[:20]!r})")
    return int(raw)


def _page(items: list[dict[str, Any]], has_more: bool) -> web.Response:
    return web.json_response({"object": "list", "data": items, "has_more": has_more})


# Jobs


async def submit_job(request: web.Request) -> web.Response:
    service = _service(request)
    config = service.state.runtime.config
    body = await read_body(request, config.limits.max_body_bytes, config.timeouts.client_body_s)
    job = await service.store.add_job(parse_job_body(body), owner=key_name(request))
    service.scheduler.wake()
    location = f"/v1/jobs/{job.id}"
    return web.json_response(job.as_json(), status=202, headers={"Location": location})


async def list_jobs(request: web.Request) -> web.Response:
    service = _service(request)
    status = request.query.get("status")
    if status is not None and status not in JOB_STATUSES:
        raise InvalidRequest(f"status: expected one of {', '.join(JOB_STATUSES)}")
    jobs, more = await service.store.list_jobs(
        status=status,
        batch_id=request.query.get("batch_id"),
        after=request.query.get("after"),
        limit=_limit(request),
        owner=key_name(request),
    )
    return _page([job.as_json() for job in jobs], more)


def _no_job(job_id: str) -> NotFound:
    return NotFound(f"no job {job_id!r} (finished jobs are deleted after their retention)")


async def _job(request: web.Request) -> Job:
    job_id = request.match_info["id"]
    job = await _service(request).store.get_job(job_id, owner=key_name(request))
    if job is None:
        raise _no_job(job_id)
    return job


async def get_job(request: web.Request) -> web.Response:
    return web.json_response((await _job(request)).as_json())


async def cancel_job(request: web.Request) -> web.Response:
    service = _service(request)
    job_id = request.match_info["id"]
    job, cancelled = await service.store.cancel_job(job_id, owner=key_name(request))
    if job is None:
        raise _no_job(job_id)
    if not cancelled:
        raise Conflict(f"job {job_id} is already {job.status}; only queued or running jobs cancel")
    service.scheduler.abandon([job_id])
    return web.json_response(job.as_json())


# Batches


async def submit_batch(request: web.Request) -> web.Response:
    service = _service(request)
    settings = service.settings
    if request.content_type in FORM_TYPES:  # curl -d and -F: a form, not the file's bytes
        raise InvalidRequest(
            "send the JSONL file itself as the body, e.g. curl --data-binary @batch.jsonl "
            "-H 'Content-Type: application/jsonl' (a form loses the file's line breaks)"
        )
    timeout_s = service.state.runtime.config.timeouts.client_body_s
    try:
        body = await read_body(request, settings.max_batch_bytes, timeout_s)
    except BodyTooLarge:
        raise BodyTooLarge(
            f"batch file over jobs.max_batch_bytes = {settings.max_batch_bytes} bytes; "
            "split it into smaller batches"
        ) from None
    lines = await asyncio.to_thread(parse_batch, body, settings.max_batch_lines)
    batch = await service.store.add_batch(lines, owner=key_name(request))
    service.scheduler.wake()
    location = f"/v1/batches/{batch.id}"
    return web.json_response(batch.as_json(), status=202, headers={"Location": location})


async def _batch(request: web.Request) -> Batch:
    batch_id = request.match_info["id"]
    store = _service(request).store
    batch = await store.get_batch(batch_id, owner=key_name(request))
    if batch is None:
        raise NotFound(f"no batch {batch_id!r} (batches are deleted after their retention)")
    return batch


async def get_batch(request: web.Request) -> web.Response:
    return web.json_response((await _batch(request)).as_json())


async def list_batches(request: web.Request) -> web.Response:
    service = _service(request)
    batches, more = await service.store.list_batches(
        after=request.query.get("after"),
        limit=_limit(request),
        owner=key_name(request),
    )
    return _page([batch.as_json() for batch in batches], more)


async def cancel_batch(request: web.Request) -> web.Response:
    service = _service(request)
    before = await _batch(request)
    if before.status != "in_progress":
        raise Conflict(f"batch {before.id} is already {before.status}")
    owner = key_name(request)
    batch, cancelled = await service.store.cancel_batch(before.id, owner=owner)
    service.scheduler.abandon(cancelled)
    assert batch is not None
    return web.json_response(batch.as_json())


async def batch_results(request: web.Request) -> web.StreamResponse:
    """The JSONL result file, one line per input line in file order, streamed page by page."""
    service = _service(request)
    batch = await _batch(request)
    if batch.status == "in_progress":
        counts = batch.as_json()["request_counts"]
        done = counts["completed"] + counts["failed"]
        raise Conflict(
            f"batch {batch.id} is in_progress ({done} of {batch.total} lines done); "
            "its results are ready when it completes"
        )
    response = web.StreamResponse(
        headers={
            "Content-Type": "application/jsonl",
            "Content-Disposition": f'attachment; filename="{batch.id}.jsonl"',
        }
    )
    await response.prepare(request)
    after, owner = 0, batch.owner
    while page := await service.store.batch_results(batch.id, after, RESULTS_PAGE, owner=owner):
        lines = "".join(json.dumps(job.result_json()) + "\n" for job in page)
        await response.write(lines.encode())
        after = page[-1].seq
    await response.write_eof()
    return response


ROUTES: list[tuple[str, dict[str, Handler]]] = [
    ("/v1/jobs", {"GET": list_jobs, "POST": submit_job}),
    ("/v1/jobs/{id}", {"GET": get_job, "DELETE": cancel_job}),
    ("/v1/batches", {"GET": list_batches, "POST": submit_batch}),
    ("/v1/batches/{id}", {"GET": get_batch}),
    ("/v1/batches/{id}/results", {"GET": batch_results}),
    ("/v1/batches/{id}/cancel", {"POST": cancel_batch}),
]


def by_method(handlers: dict[str, Handler]) -> Handler:
    async def handle(request: web.Request) -> web.StreamResponse:
        return await handlers[request.method](request)

    return handle

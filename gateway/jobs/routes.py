"""HTTP endpoints for deferred inference: /v1/jobs (one request), /v1/batches (OpenAI's Batch
API over a file uploaded to /v1/files, gateway/jobs/files.py, or a JSONL file sent as the
body) and /v1/files. Handlers validate and orchestrate; the store owns the state.

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

from gateway.boundedjson import load_json
from gateway.datapath.auth import key_name
from gateway.datapath.body import read_body
from gateway.errors import BodyTooLarge, Conflict, InvalidRequest, NotFound, clipped
from gateway.jobs import files
from gateway.jobs.files import no_file, service_of
from gateway.jobs.model import BATCH_ENDPOINTS, JOB_STATUSES, Batch, BatchSpec, Job
from gateway.jobs.requests import (
    MAX_JOB_DEPTH,
    BatchCreate,
    BatchLine,
    completion_window_s,
    parse_batch,
    parse_batch_create,
    parse_batch_file,
    parse_job_body,
)
from gateway.jobs.service import JobService

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
MAX_PAGE = 1000
RESULTS_PAGE = 1000
FORM_TYPES = frozenset({"multipart/form-data", "application/x-www-form-urlencoded"})
# ASCII digits only: str.isdigit also takes '²' and other scripts' digits, which int() refuses.
PAGE_SIZE = re.compile(r"[0-9]{1,9}")


def _limit(request: web.Request) -> int:
    raw = request.query.get("limit", "100")
    if not PAGE_SIZE.fullmatch(raw) or not 1 <= int(raw) <= MAX_PAGE:
        raise InvalidRequest(f"limit: expected an integer from 1 to {MAX_PAGE} (got {raw[:20]!r})")
    return int(raw)


def _page(items: list[dict[str, Any]], has_more: bool) -> web.Response:
    return web.json_response({"object": "list", "data": items, "has_more": has_more})


# Jobs


async def submit_job(request: web.Request) -> web.Response:
    service = service_of(request)
    config = service.state.runtime.config
    body = await read_body(request, config.limits.max_body_bytes, config.timeouts.client_body_s)
    job = await service.store.add_job(parse_job_body(body), owner=key_name(request))
    service.scheduler.wake()
    location = f"/v1/jobs/{job.id}"
    return web.json_response(job.as_json(), status=202, headers={"Location": location})


async def list_jobs(request: web.Request) -> web.Response:
    service = service_of(request)
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
    job = await service_of(request).store.get_job(job_id, owner=key_name(request))
    if job is None:
        raise _no_job(job_id)
    return job


async def get_job(request: web.Request) -> web.Response:
    return web.json_response((await _job(request)).as_json())


async def cancel_job(request: web.Request) -> web.Response:
    service = service_of(request)
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
    """POST /v1/batches: OpenAI's form (JSON naming an uploaded file), or a JSONL body."""
    service = service_of(request)
    settings = service.settings
    if request.content_type in FORM_TYPES:  # curl -d and -F: a form, not the file's bytes
        raise InvalidRequest(
            "send the JSONL file itself as the body, e.g. curl --data-binary @batch.jsonl "
            "-H 'Content-Type: application/jsonl' (a form loses the file's line breaks), or "
            'upload it to /v1/files and name it: {"input_file_id": ..., "endpoint": ..., '
            '"completion_window": "24h"}'
        )
    timeout_s = service.state.runtime.config.timeouts.client_body_s
    try:
        body = await read_body(request, settings.max_batch_bytes, timeout_s)
    except BodyTooLarge:
        raise BodyTooLarge(
            f"batch file over jobs.max_batch_bytes = {settings.max_batch_bytes} bytes; "
            "split it into smaller batches"
        ) from None
    if request.content_type == "application/json":
        data = _json_object(body)
        if isinstance(data, dict) and "custom_id" not in data:
            return await _create_from_file(service, request, parse_batch_create(data))
        # Otherwise a JSONL body sent as application/json, as before the Files API.
    lines = await asyncio.to_thread(parse_batch, body, settings.max_batch_lines)
    return await _accepted(service, request, lines)


async def _accepted(
    service: JobService, request: web.Request, lines: list[BatchLine]
) -> web.Response:
    batch = await service.store.add_batch(lines, owner=key_name(request))
    service.scheduler.wake()
    location = f"/v1/batches/{batch.id}"
    return web.json_response(batch.as_json(), status=202, headers={"Location": location})


def _json_object(body: bytes) -> Any:
    """The body as JSON when it is one JSON value (a JSONL body of several lines is not)."""
    try:
        return load_json(body.decode("utf-8"), MAX_JOB_DEPTH)
    except ValueError:  # not UTF-8, not JSON, several lines, too deep: read as JSONL
        return None


async def _create_from_file(
    service: JobService, request: web.Request, asked: BatchCreate
) -> web.Response:
    """OpenAI's batches.create: the named upload's lines become the batch's jobs, all sent
    to `endpoint`; the lines not run within `completion_window` end expired."""
    if asked.endpoint not in BATCH_ENDPOINTS:
        raise InvalidRequest(
            f"endpoint: expected one of {', '.join(BATCH_ENDPOINTS)} "
            f"(got {clipped(asked.endpoint)!r})"
        )
    owner = key_name(request)
    stored = await service.store.get_file(asked.input_file_id, owner=owner)
    if stored is None:
        raise no_file(asked.input_file_id)
    if stored.kind != "upload":
        raise InvalidRequest(
            f"input_file_id: {stored.id} is a batch's output file; name a file uploaded with "
            "purpose 'batch'"
        )
    content = await service.store.file_content(stored.id, owner=owner)
    if content is None:
        raise no_file(stored.id)
    max_lines = service.settings.max_batch_lines
    lines = await asyncio.to_thread(parse_batch_file, content, max_lines, asked.endpoint)
    spec = BatchSpec(
        input_file_id=stored.id,
        endpoint=asked.endpoint,
        completion_window=asked.completion_window,
        window_s=completion_window_s(asked.completion_window),
        metadata=None if asked.metadata is None else json.dumps(asked.metadata),
    )
    batch = await service.store.add_batch(lines, owner=owner, spec=spec)
    service.scheduler.wake()
    return web.json_response(batch.as_json(), headers={"Location": f"/v1/batches/{batch.id}"})


async def _batch(request: web.Request) -> Batch:
    batch_id = request.match_info["id"]
    store = service_of(request).store
    batch = await store.get_batch(batch_id, owner=key_name(request))
    if batch is None:
        raise NotFound(f"no batch {batch_id!r} (batches are deleted after their retention)")
    return batch


async def get_batch(request: web.Request) -> web.Response:
    return web.json_response((await _batch(request)).as_json())


async def list_batches(request: web.Request) -> web.Response:
    service = service_of(request)
    batches, more = await service.store.list_batches(
        after=request.query.get("after"),
        limit=_limit(request),
        owner=key_name(request),
    )
    data = [batch.as_json() for batch in batches]
    first, last = (data[0]["id"], data[-1]["id"]) if data else (None, None)
    return web.json_response(
        {"object": "list", "data": data, "first_id": first, "last_id": last, "has_more": more}
    )


async def cancel_batch(request: web.Request) -> web.Response:
    service = service_of(request)
    before = await _batch(request)
    if before.status not in ("in_progress", "cancelling"):
        raise Conflict(f"batch {before.id} is already {before.status}")
    if before.status == "cancelling":  # asked again: the same answer, as OpenAI gives
        return web.json_response(before.as_json())
    owner = key_name(request)
    batch, cancelled = await service.store.cancel_batch(before.id, owner=owner)
    service.scheduler.abandon(cancelled)
    assert batch is not None
    return web.json_response(batch.as_json())


async def batch_results(request: web.Request) -> web.StreamResponse:
    """The JSONL result file, one line per input line in file order, streamed page by page."""
    service = service_of(request)
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
    ("/v1/files", {"GET": files.listing, "POST": files.upload}),
    ("/v1/files/{id}", {"GET": files.retrieve, "DELETE": files.delete}),
    ("/v1/files/{id}/content", {"GET": files.content}),
]


def by_method(handlers: dict[str, Handler]) -> Handler:
    async def handle(request: web.Request) -> web.StreamResponse:
        return await handlers[request.method](request)

    return handle

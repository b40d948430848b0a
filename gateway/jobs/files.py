"""The OpenAI Files API on the job store, for the Batch API: /v1/files.

An upload (`purpose` "batch", multipart as the `openai` SDK sends it) is a batch input file:
checked line by line when it arrives (a file that is not JSONL of requests, has a duplicate
custom_id, or is over jobs.max_batch_bytes or jobs.max_batch_lines is refused whole, a 400 or
413 naming what to fix), then kept in the store, counted against its key's quota, until it is
deleted or jobs.result_retention_s after its upload (or its `expires_after`). A batch's output
and error files are listed and read like uploads, but their lines are the batch's finished jobs,
read when asked: nothing is copied. Every file belongs to the API key that created it; another
key's file is a 404 like an unknown id.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import BodyPartReader, web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.multipart import BadContentDispositionHeader
from aiohttp.web_protocol import RequestPayloadError

from gateway.datapath.auth import key_name
from gateway.errors import BodyTooLarge, ClientTimeout, InvalidRequest, NotFound, clipped
from gateway.jobs.model import StoredFile, output_file_of
from gateway.jobs.requests import parse_batch_file, text_problem
from gateway.jobs.service import JOBS, JobService

RESULTS_PAGE = 1000
MAX_FILES_PAGE = 10_000  # OpenAI's own cap on GET /v1/files?limit
MAX_FIELD_BYTES = 1024  # a form field other than the file: purpose, expires_after[...]
MAX_FILENAME_CHARS = 255
MULTIPART_SLACK = 64 * 1024  # boundaries and part headers around the file's bytes
PAGE_SIZE = re.compile(r"[0-9]{1,9}")
FIELDS = ("file", "purpose", "expires_after[anchor]", "expires_after[seconds]")
# OpenAI's bounds on a file's expires_after[seconds]: an hour to 30 days.
MIN_EXPIRY_S, MAX_EXPIRY_S = 3600, 30 * 24 * 3600


def service_of(request: web.Request) -> JobService:
    service = request.app.get(JOBS)
    if service is None:
        raise NotFound(
            "deferred jobs are off (the Jobs, Batches and Files APIs): add a 'jobs:' section "
            "with a 'store:' (an SQLite file path or a postgresql:// URL) to the gateway config "
            "and restart it"
        )
    return service


def no_file(file_id: str) -> NotFound:
    return NotFound(f"no file {clipped(file_id)!r} (it may have been deleted or expired)")


async def upload(request: web.Request) -> web.Response:
    """POST /v1/files: a batch input file, multipart/form-data with `file` and `purpose`."""
    service = service_of(request)
    settings = service.settings
    if request.content_type != "multipart/form-data":
        raise InvalidRequest(
            "send the file as multipart/form-data with fields 'file' and 'purpose' "
            "(curl -F purpose=batch -F file=@batch.jsonl), as the OpenAI SDK does"
        )
    limit = settings.max_batch_bytes
    length = request.content_length
    if length is not None and length > limit + MULTIPART_SLACK:
        raise _too_large(limit)
    timeout_s = service.state.runtime.config.timeouts.client_body_s
    try:
        async with asyncio.timeout(timeout_s):
            fields, filename, content = await _form(request, limit)
    except TimeoutError:
        raise ClientTimeout(
            f"the upload was not received within timeouts.client_body_s = {timeout_s} s"
        ) from None
    except (
        RequestPayloadError, HttpProcessingError, ValueError, AssertionError,
        BadContentDispositionHeader,
    ) as exc:  # fmt: skip
        # aiohttp's multipart reader says ValueError / AssertionError for broken framing, and
        # warns of an unreadable Content-Disposition (an error where warnings are errors).
        raise InvalidRequest(
            f"the multipart body is broken ({type(exc).__name__}): send it again, whole"
        ) from None
    purpose = fields.get("purpose")
    if purpose != "batch":
        shown = "missing" if purpose is None else repr(clipped(purpose))
        raise InvalidRequest(
            f"purpose: expected 'batch' (got {shown}); this gateway stores files for the "
            "Batch API only"
        )
    if content is None:
        raise InvalidRequest("file: required; send the batch's JSONL file in a 'file' field")
    expires_s = _expiry(fields)
    await asyncio.to_thread(parse_batch_file, content, settings.max_batch_lines)
    stored = await service.store.add_file(
        content, filename or "upload.jsonl", owner=key_name(request), expires_s=expires_s
    )
    return web.json_response(stored.as_json())


def _too_large(limit: int) -> BodyTooLarge:
    return BodyTooLarge(
        f"file over jobs.max_batch_bytes = {limit} bytes; split it into smaller batches"
    )


async def _form(
    request: web.Request, limit: int
) -> tuple[dict[str, str], str | None, bytes | None]:
    """The form's short fields, and the file's name and bytes (at most `limit`)."""
    fields: dict[str, str] = {}
    filename: str | None = None
    content: bytes | None = None
    reader = await request.multipart()
    while (part := await reader.next()) is not None:
        if not isinstance(part, BodyPartReader):
            raise InvalidRequest("a form field holds another multipart body; send plain fields")
        name = part.name
        if not name:  # no Content-Disposition, or one aiohttp could not read (it warned)
            raise InvalidRequest("the multipart body is broken: a part has no field name")
        if name not in FIELDS:
            raise InvalidRequest(
                f"unknown form field {clipped(name)!r} (expected {', '.join(FIELDS)})"
            )
        if name in fields or (name == "file" and content is not None):
            raise InvalidRequest(f"form field {name!r} is sent twice; send it once")
        if name == "file":
            filename = _filename(part.filename)
            content = bytes(await _read(part, limit, _too_large(limit)))
            continue
        too_long = InvalidRequest(f"form field {name!r} is over {MAX_FIELD_BYTES} bytes")
        raw = await _read(part, MAX_FIELD_BYTES, too_long)
        try:
            fields[name] = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidRequest(f"form field {name!r} is not UTF-8 text") from None
    return fields, filename, content


async def _read(part: BodyPartReader, limit: int, over: Exception) -> bytearray:
    data = bytearray()
    while chunk := await part.read_chunk():
        data += chunk
        if len(data) > limit:
            raise over
    return data


def _filename(name: str | None) -> str | None:
    if name is None:
        return None
    name = name.rsplit("/", 1)[-1].rsplit("\\", 1)[-1][:MAX_FILENAME_CHARS]
    if text_problem(name) is not None or not name.isprintable():
        raise InvalidRequest("file: its filename must be printable text (no NUL, no controls)")
    return name or None


def _expiry(fields: dict[str, str]) -> float | None:
    """Seconds from upload to the file's expiry when the form names one (OpenAI's
    expires_after: anchor created_at, 3600 to 2592000 seconds)."""
    anchor, seconds = fields.get("expires_after[anchor]"), fields.get("expires_after[seconds]")
    if anchor is None and seconds is None:
        return None
    if anchor != "created_at":
        raise InvalidRequest("expires_after[anchor]: expected 'created_at'")
    if seconds is None or not PAGE_SIZE.fullmatch(seconds):
        raise InvalidRequest("expires_after[seconds]: expected an integer number of seconds")
    if not MIN_EXPIRY_S <= int(seconds) <= MAX_EXPIRY_S:
        raise InvalidRequest(
            f"expires_after[seconds]: expected {MIN_EXPIRY_S} to {MAX_EXPIRY_S} (got {seconds})"
        )
    return float(seconds)


async def _file(request: web.Request) -> tuple[JobService, StoredFile]:
    service = service_of(request)
    file_id = request.match_info["id"]
    found = await service.store.get_file(file_id, owner=key_name(request))
    if found is None:
        raise no_file(file_id)
    return service, found


async def _sized(service: JobService, stored: StoredFile) -> dict[str, Any]:
    """The file's JSON, counting an output file's bytes the first time it is asked."""
    if stored.bytes is not None:
        return stored.as_json()
    size = 0
    async for chunk in _output_lines(service, stored):
        size += len(chunk)
    await service.store.counted(stored.id, size)
    return stored.as_json(size)


async def retrieve(request: web.Request) -> web.Response:
    service, stored = await _file(request)
    return web.json_response(await _sized(service, stored))


async def content(request: web.Request) -> web.StreamResponse:
    """GET /v1/files/{id}/content: the upload's bytes, or the output file's lines, streamed."""
    service, stored = await _file(request)
    disposition = {"Content-Disposition": f'attachment; filename="{stored.filename}"'}
    if stored.kind == "upload":
        data = await service.store.file_content(stored.id, owner=stored.owner)
        if data is None:  # deleted between the two reads
            raise no_file(stored.id)
        headers = {"Content-Type": "application/octet-stream", **disposition}
        return web.Response(body=data, headers=headers)
    response = web.StreamResponse(headers={"Content-Type": "application/jsonl", **disposition})
    await response.prepare(request)
    async for chunk in _output_lines(service, stored):
        await response.write(chunk)
    await response.write_eof()
    return response


async def _output_lines(service: JobService, stored: StoredFile) -> AsyncIterator[bytes]:
    """An output or error file's lines, a page of the batch's jobs at a time."""
    batch_of = output_file_of(stored.id)
    if batch_of is None or stored.kind == "upload":
        return
    batch_id, kind = batch_of
    after = 0
    while page := await service.store.batch_results(
        batch_id, after, RESULTS_PAGE, owner=stored.owner, kind=kind
    ):
        yield "".join(json.dumps(job.result_json()) + "\n" for job in page).encode()
        after = page[-1].seq


async def listing(request: web.Request) -> web.Response:
    """GET /v1/files: newest first (order=asc for oldest first), `after` a file id."""
    service = service_of(request)
    query = request.query
    purpose = query.get("purpose")
    if purpose is not None and purpose not in ("batch", "batch_output"):
        raise InvalidRequest("purpose: this gateway keeps 'batch' and 'batch_output' files")
    order = query.get("order", "desc")
    if order not in ("asc", "desc"):
        raise InvalidRequest(f"order: expected 'asc' or 'desc' (got {clipped(order)!r})")
    raw = query.get("limit", str(MAX_FILES_PAGE))
    if not PAGE_SIZE.fullmatch(raw) or not 1 <= int(raw) <= MAX_FILES_PAGE:
        raise InvalidRequest(f"limit: expected an integer from 1 to {MAX_FILES_PAGE}")
    files, more = await service.store.list_files(
        purpose=purpose, after=query.get("after"), limit=int(raw),
        newest_first=order == "desc", owner=key_name(request),
    )  # fmt: skip
    data = [await _sized(service, stored) for stored in files]
    return web.json_response(
        {
            "object": "list",
            "data": data,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
            "has_more": more,
        }
    )


async def delete(request: web.Request) -> web.Response:
    service = service_of(request)
    file_id = request.match_info["id"]
    if not await service.store.delete_file(file_id, owner=key_name(request)):
        raise no_file(file_id)
    return web.json_response({"id": file_id, "object": "file", "deleted": True})

"""What the job stores hold: a job, a batch, the outcome of an attempt, and the rows a batch's
lines become (gateway/jobs/sqlite.py and gateway/jobs/postgres.py store them alike)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any, Literal

from gateway.boundedjson import load_json
from gateway.jobs.quota import stored_bytes
from gateway.jobs.requests import MAX_BODY_DEPTH, BatchLine

JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]
# What recording an attempt's replica found: go ahead; the replica already runs `limit` jobs
# (of every gateway); the job is no longer this attempt's (cancelled, taken over).
Sending = Literal["sent", "full", "gone"]
JOB_STATUSES: tuple[JobStatus, ...] = ("queued", "running", "succeeded", "failed", "cancelled")
# A cancel deletes the input of each job it stops: it never runs, and its share of the quota
# comes back at once (a cancelled line keeps its row for the results file until it expires).
INPUT_DELETED = "body = '', size = 0"


@dataclass(frozen=True)
class Outcome:
    """How a job ended: the replica's answer, an error, or both (a failed answer)."""

    status: Literal["succeeded", "failed", "cancelled"]
    status_code: int | None = None
    response: str | None = None  # the replica's body as text
    error_code: str | None = None
    error_message: str | None = None


@dataclass(frozen=True)
class Job:
    seq: int
    id: str
    batch_id: str | None
    line: int | None
    custom_id: str | None
    method: str
    url: str
    body: str
    status: JobStatus
    attempt: int
    created_at: float
    started_at: float | None
    finished_at: float | None
    expires_at: float | None
    status_code: int | None
    response: str | None
    error_code: str | None
    error_message: str | None
    owner: str = ""
    # The replica this attempt was sent to; a job run again because its gateway died goes back
    # there (it may hold the answer: the Idempotency-Key replay, replica/idempotency.py).
    replica: str | None = None
    size: int = 0  # bytes of body and answer, counted against the owner's quota

    def result_json(self) -> dict[str, Any]:
        """The OpenAI Batch output line: response when a replica answered, error otherwise."""
        response = None
        if self.status_code is not None:
            response = {"status_code": self.status_code, "body": json_or_text(self.response)}
        error = None
        if self.error_code is not None:
            error = {"code": self.error_code, "message": self.error_message}
        return {"id": self.id, "custom_id": self.custom_id, "response": response, "error": error}

    def as_json(self) -> dict[str, Any]:
        return {
            "object": "job",
            **self.result_json(),
            "status": self.status,
            "method": self.method,
            "url": self.url,
            "batch_id": self.batch_id,
            "attempts": self.attempt,
            "created_at": unix_seconds(self.created_at),
            "started_at": unix_seconds(self.started_at),
            "finished_at": unix_seconds(self.finished_at),
            "expires_at": unix_seconds(self.expires_at),
        }


# The OpenAI Batch API's endpoints a batch may name (every line's url must be it).
BATCH_ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings",
                   "/v1/responses", "/v1/moderations")  # fmt: skip
FileKind = Literal["upload", "output", "error"]


@dataclass(frozen=True)
class BatchSpec:
    """What POST /v1/batches names in OpenAI's form (a batch from a JSONL body has none)."""

    input_file_id: str
    endpoint: str
    completion_window: str
    window_s: float
    metadata: str | None  # JSON text of the client's metadata map


@dataclass(frozen=True)
class Batch:
    """A batch's row and its lines' counts by status. Its status, in OpenAI's words:
    in_progress while lines remain; cancelling once cancelled (cancelled_at) until its running
    lines end; expired when its completion window closed before every line ran (expired_at);
    completed otherwise. Lines are checked when the batch is created (a bad file is a 400), so
    `validating` and `failed` never show; finalizing is the instant the last line ends."""

    id: str
    created_at: float
    total: int
    cancelled_at: float | None
    completed_at: float | None
    expires_at: float | None
    counts: dict[str, int]
    owner: str = ""
    input_file_id: str | None = None
    endpoint: str | None = None
    completion_window: str | None = None
    deadline: float | None = None  # created_at + the completion window: lines not run expire
    metadata: str | None = None
    expired_at: float | None = None

    @property
    def status(self) -> str:
        if self.cancelled_at is not None:
            return "cancelled" if self.completed_at is not None else "cancelling"
        if self.completed_at is None:
            return "in_progress"
        return "expired" if self.expired_at is not None else "completed"

    @property
    def succeeded(self) -> int:
        return self.counts.get("succeeded", 0)

    @property
    def failed(self) -> int:
        """Lines that ended without success: failed, cancelled or expired."""
        return self.counts.get("failed", 0) + self.counts.get("cancelled", 0)

    def file_id(self, kind: FileKind) -> str | None:
        """The id of its output or error file once it ended with lines of that kind."""
        lines = self.succeeded if kind == "output" else self.failed
        if self.completed_at is None or lines == 0:
            return None
        return output_file_id(self.id, kind)

    def as_json(self) -> dict[str, Any]:
        counts, ended = self.counts, self.completed_at
        cancelled, expired = self.cancelled_at is not None, self.expired_at is not None
        return {
            "id": self.id,
            "object": "batch",
            "endpoint": self.endpoint,
            "errors": None,
            "input_file_id": self.input_file_id,
            "completion_window": self.completion_window,
            "status": self.status,
            "output_file_id": self.file_id("output"),
            "error_file_id": self.file_id("error"),
            "created_at": unix_seconds(self.created_at),
            "in_progress_at": unix_seconds(self.created_at),
            "expires_at": unix_seconds(self.deadline),
            "finalizing_at": unix_seconds(ended),
            "completed_at": unix_seconds(ended if not (cancelled or expired) else None),
            "failed_at": None,
            "expired_at": unix_seconds(self.expired_at),
            "cancelling_at": unix_seconds(self.cancelled_at),
            "cancelled_at": unix_seconds(ended if cancelled else None),
            "request_counts": {
                "total": self.total,
                "completed": self.succeeded,
                "failed": self.failed,
                "queued": counts.get("queued", 0),
                "running": counts.get("running", 0),
            },
            "metadata": None if self.metadata is None else load_json(self.metadata, 2),
            "results_url": f"/v1/batches/{self.id}/results",
            "results_expire_at": unix_seconds(self.expires_at),
        }


OUTPUT_PREFIX = {"output": "file-output-", "error": "file-errors-"}


def output_file_id(batch_id: str, kind: FileKind) -> str:
    return OUTPUT_PREFIX[kind] + batch_id.removeprefix("batch_")


def output_file_of(file_id: str) -> tuple[str, FileKind] | None:
    """(batch id, kind) of an output or error file's id; None for an uploaded file's."""
    for kind in ("output", "error"):
        prefix = OUTPUT_PREFIX[kind]
        if file_id.startswith(prefix):
            return "batch_" + file_id.removeprefix(prefix), kind
    return None


@dataclass(frozen=True)
class StoredFile:
    """A file of the Files API: an upload (its bytes in the store), or a batch's output or
    error file, whose lines are read from the batch's jobs (`bytes` None until first counted)."""

    seq: int
    id: str
    owner: str
    purpose: str
    filename: str
    bytes: int | None
    created_at: float
    expires_at: float | None
    kind: FileKind
    batch_id: str | None = None

    def as_json(self, size: int | None = None) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "file",
            "bytes": self.bytes if size is None else size,
            "created_at": unix_seconds(self.created_at),
            "expires_at": unix_seconds(self.expires_at),
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
            "status_details": None,
        }


def unix_seconds(at: float | None) -> int | None:
    return None if at is None else int(at)


def json_or_text(text: str | None) -> Any:
    """A replica's answer as JSON, or as the text it is when that is not JSON a client could
    send us (nested past MAX_BODY_DEPTH, say): every read of a job works."""
    if text is None:
        return None
    try:
        return load_json(text, MAX_BODY_DEPTH)
    except ValueError:
        return text


def new_id(prefix: str, separator: str = "_") -> str:
    return f"{prefix}{separator}{uuid.uuid4().hex}"


# How a batch's unfinished lines end: (error_code, error_message) of each.
CANCELLED = ("cancelled", "the batch was cancelled")
EXPIRED = ("batch_expired", "this request could not be run before the batch's completion window "
           "closed")  # fmt: skip
# The lines of a batch's output file and of its error file (SQL, after a WHERE).
RESULTS_OF: dict[FileKind | None, str] = {
    None: "",
    "upload": "",
    "output": " AND status = 'succeeded'",
    "error": " AND status <> 'succeeded'",
}


def spec_row(spec: BatchSpec | None, now: float) -> tuple[Any, ...]:
    """A batch row's input_file_id, endpoint, completion_window, deadline and metadata."""
    if spec is None:
        return (None, None, None, None, None)
    return (spec.input_file_id, spec.endpoint, spec.completion_window, now + spec.window_s,
            spec.metadata)  # fmt: skip


def output_files(
    counts: dict[str, int], batch_id: str, owner: str, now: float, expires_at: float
) -> list[tuple[Any, ...]]:
    """The file rows a batch that just ended gets: its output file when a line succeeded, its
    error file when one did not (their lines are read from the jobs, their size when asked)."""
    rows = []
    succeeded = counts.get("succeeded", 0)
    for kind, lines in (("output", succeeded), ("error", sum(counts.values()) - succeeded)):
        if lines:
            file_id = output_file_id(batch_id, kind)  # type: ignore[arg-type]
            filename = f"{batch_id}_{kind}.jsonl"
            rows.append((file_id, owner, "batch_output", filename, now, expires_at, kind,
                         batch_id))  # fmt: skip
    return rows


def line_row(batch_id: str, line: BatchLine, now: float) -> tuple[Any, ...]:
    """The row of one batch line, its `size` last (the stores add the owner after it)."""
    request = line.request
    if request is None:  # a bad line: failed at once, with its reason
        return (new_id("job"), batch_id, line.line, line.custom_id, "POST", "", "{}", "failed",
                now, now, "invalid_request", f"line {line.line}: {line.error}", 2)  # fmt: skip
    body = request.body_json()
    return (new_id("job"), batch_id, line.line, request.custom_id, request.method, request.url,
            body, "queued", now, None, None, None, stored_bytes(body))  # fmt: skip

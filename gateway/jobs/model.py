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


@dataclass(frozen=True)
class Batch:
    id: str
    created_at: float
    total: int
    cancelled_at: float | None
    completed_at: float | None
    expires_at: float | None
    counts: dict[str, int]
    owner: str = ""

    @property
    def status(self) -> str:
        if self.cancelled_at is not None:
            return "cancelled" if self.completed_at is not None else "cancelling"
        return "completed" if self.completed_at is not None else "in_progress"

    def as_json(self) -> dict[str, Any]:
        counts = self.counts
        return {
            "id": self.id,
            "object": "batch",
            "status": self.status,
            "created_at": unix_seconds(self.created_at),
            "completed_at": unix_seconds(self.completed_at),
            "cancelled_at": unix_seconds(self.cancelled_at),
            "expires_at": unix_seconds(self.expires_at),
            "request_counts": {
                "total": self.total,
                "completed": counts.get("succeeded", 0),
                "failed": counts.get("failed", 0) + counts.get("cancelled", 0),
                "queued": counts.get("queued", 0),
                "running": counts.get("running", 0),
            },
            "results_url": f"/v1/batches/{self.id}/results",
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


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def line_row(batch_id: str, line: BatchLine, now: float) -> tuple[Any, ...]:
    """The row of one batch line, its `size` last (the stores add the owner after it)."""
    request = line.request
    if request is None:  # a bad line: failed at once, with its reason
        return (new_id("job"), batch_id, line.line, line.custom_id, "POST", "", "{}", "failed",
                now, now, "invalid_request", f"line {line.line}: {line.error}", 2)  # fmt: skip
    body = request.body_json()
    return (new_id("job"), batch_id, line.line, request.custom_id, request.method, request.url,
            body, "queued", now, None, None, None, stored_bytes(body))  # fmt: skip

"""What a deferred job asks for: one JSON request to a replica path, sent as the body of
POST /v1/jobs or as one line of a batch file (the OpenAI Batch API line shape).

Parsing is pure. A bad job body is a 400; a bad batch line becomes a `BadLine` with its
reason, which the store records as that line's failed result while the other lines proceed.

JSON is read under one depth rule (gateway/boundedjson.py, as our replica reads bodies): a
request body may nest `MAX_BODY_DEPTH` arrays and objects, so a job holding one may nest one
level more. Past it a job is a 400
and a line fails alone, never a `RecursionError`; a stored answer past it reads as text.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from gateway.boundedjson import MAX_DEPTH, TooDeep, load_json
from gateway.datapath.h1client import DOT_SEGMENT_PROBLEM, dot_segment
from gateway.errors import InvalidRequest, clipped, key_path

# Paths the gateway answers itself: a job aimed at one would never reach a replica.
GATEWAY_PATHS = (
    "/v1/jobs",
    "/v1/batches",
    "/v1/files",
    "/admin",
    "/healthz",
    "/readyz",
    "/metrics",
)
PRINTABLE_ASCII = re.compile(r"[!-~]*")
MAX_BODY_DEPTH = MAX_DEPTH  # a request body's nesting, as a replica sees it
MAX_JOB_DEPTH = MAX_BODY_DEPTH + 1  # a job or batch line: {"body": ...} adds one level


def text_problem(value: str) -> str | None:
    """Why a string cannot be stored (both stores refuse these characters), or None."""
    if "\x00" in value:
        return "must not contain a NUL character (\\u0000)"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "must be valid Unicode: no lone surrogate (\\ud800-\\udfff)"
    return None


def _replica_path(value: str) -> str:
    if not value.startswith("/") or value.startswith("//"):
        raise ValueError("expected a replica path starting with '/', e.g. /v1/completions")
    if not PRINTABLE_ASCII.fullmatch(value):
        raise ValueError("expected printable ASCII without spaces; percent-encode the rest")
    if dot_segment(value):  # as the proxy refuses it: refused here, never sent and retried
        raise ValueError(f"the path {DOT_SEGMENT_PROBLEM}")
    path = value.split("?", 1)[0]
    if any(path == own or path.startswith(own + "/") for own in GATEWAY_PATHS):
        raise ValueError(f"{path} is the gateway's own endpoint, not a replica's")
    return value


def _storable(value: str) -> str:
    problem = text_problem(value)
    if problem is not None:
        raise ValueError(problem)
    return value


def _not_streamed(body: dict[str, Any]) -> dict[str, Any]:
    if body.get("stream") is True:
        raise ValueError("'stream': true is not supported for deferred jobs (results are stored)")
    return body


class JobRequest(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    custom_id: Annotated[str, AfterValidator(_storable)] | None = Field(
        None, min_length=1, max_length=512
    )
    method: Literal["POST"] = "POST"
    url: Annotated[str, AfterValidator(_replica_path)]
    body: Annotated[dict[str, Any], AfterValidator(_not_streamed)]

    def body_json(self) -> str:
        return json.dumps(self.body, separators=(",", ":"))


@dataclass(frozen=True)
class BatchLine:
    """One line of a batch file: a request to run, or the reason it cannot run (then it gets
    a failed result with that reason)."""

    line: int
    custom_id: str | None
    request: JobRequest | None = None
    error: str | None = None


def describe(exc: ValidationError) -> str:
    problems = []
    for error in exc.errors():
        where = key_path(error["loc"])
        if error["type"] == "extra_forbidden":
            problems.append(f"{where}: unknown key (expected custom_id, method, url, body)")
        elif error["type"] == "missing":
            problems.append(f"{where}: required key is missing")
        else:
            problems.append(f"{where}: {error['msg'].removeprefix('Value error, ')}")
    return "; ".join(problems)


def parse_job_body(body: bytes) -> JobRequest:
    """The bytes of POST /v1/jobs (UTF-8, or UTF-16/32 as Python's json detects), or
    InvalidRequest saying what to fix."""
    try:
        data = load_json(body.decode(json.detect_encoding(body), "surrogatepass"), MAX_JOB_DEPTH)
    except TooDeep as exc:
        raise InvalidRequest(f"the body: {exc}") from None
    except ValueError as exc:  # not UTF-8, not JSON, an integer of 5,000 digits
        raise InvalidRequest(f"the body is not valid JSON: {exc}") from None
    return parse_job(data)


def parse_job(data: Any) -> JobRequest:
    """The body of POST /v1/jobs, or InvalidRequest saying what to fix."""
    if not isinstance(data, dict):
        raise InvalidRequest(
            'expected a JSON object like {"url": "/v1/completions", "body": {...}}'
        )
    try:
        return JobRequest.model_validate(data)
    except ValidationError as exc:
        raise InvalidRequest(describe(exc)) from None


def parse_batch(data: bytes, max_lines: int) -> list[BatchLine]:
    """Every non-blank line of a JSONL batch file, parsed or failed with its reason."""
    lines = [(n, raw) for n, raw in enumerate(data.split(b"\n"), start=1) if raw.strip()]
    if not lines:
        raise InvalidRequest("the batch file has no requests: send one JSON object per line")
    if len(lines) > max_lines:
        raise InvalidRequest(
            f"the batch file has {len(lines)} lines, over jobs.max_batch_lines = {max_lines}; "
            "split it into smaller batches"
        )
    first_line: dict[str, int] = {}
    parsed = []
    for number, raw in lines:
        item = _parse_line(number, raw)
        if item.request is not None and item.custom_id is not None:
            seen = first_line.setdefault(item.custom_id, number)
            if seen != number:
                reason = f"custom_id {item.custom_id!r} is also on line {seen}; make it unique"
                item = BatchLine(number, item.custom_id, error=reason)
        parsed.append(item)
    return parsed


def _parse_line(number: int, raw: bytes) -> BatchLine:
    try:
        data = load_json(raw.decode("utf-8"), MAX_JOB_DEPTH)
    except UnicodeDecodeError:
        return BatchLine(number, None, error="the line is not UTF-8 text")
    except json.JSONDecodeError as exc:
        return BatchLine(number, None, error=f"not valid JSON: {exc.msg} at column {exc.colno}")
    except TooDeep as exc:
        return BatchLine(number, None, error=str(exc))
    except ValueError as exc:  # an integer of 5,000 digits
        return BatchLine(number, None, error=f"not valid JSON: {exc}")
    if not isinstance(data, dict):
        return BatchLine(number, None, error=f"expected a JSON object, got {type(data).__name__}")
    custom_id = data.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return BatchLine(
            number, None, error="custom_id: required, a string naming this request (no NUL)"
        )
    if (problem := text_problem(custom_id)) is not None:  # not even the result may name it
        return BatchLine(number, None, error=f"custom_id: {problem}")
    try:
        return BatchLine(number, custom_id, request=JobRequest.model_validate(data))
    except ValidationError as exc:
        return BatchLine(number, custom_id, error=describe(exc))


# The OpenAI Files and Batches API (gateway/jobs/files.py): a batch names an uploaded file.

MAX_FILE_PROBLEMS = 5  # of a refused file's bad lines, named in the 400
MAX_WINDOW_S = 7 * 24 * 3600.0
WINDOW = re.compile(r"([1-9][0-9]{0,6})([smh])")
WINDOW_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}
MAX_METADATA_PAIRS, MAX_METADATA_KEY, MAX_METADATA_VALUE = 16, 64, 512


def completion_window_s(value: str) -> float:
    """Seconds of a completion window: OpenAI's "24h", or any `<n>s|m|h` up to 7 days."""
    match = WINDOW.fullmatch(value)
    if match is None or int(match[1]) * WINDOW_UNITS[match[2]] > MAX_WINDOW_S:
        raise ValueError('expected "24h" (or a duration like "90m", "30s": 1s to 168h)')
    return int(match[1]) * WINDOW_UNITS[match[2]]


def _window(value: str) -> str:
    completion_window_s(value)
    return value


def _metadata(value: dict[str, str] | None) -> dict[str, str] | None:
    if value is None:
        return None
    if len(value) > MAX_METADATA_PAIRS:
        raise ValueError(f"at most {MAX_METADATA_PAIRS} key-value pairs")
    for key, item in value.items():
        if len(key) > MAX_METADATA_KEY or len(item) > MAX_METADATA_VALUE:
            raise ValueError(
                f"keys up to {MAX_METADATA_KEY} characters, values up to {MAX_METADATA_VALUE}"
            )
        if (problem := text_problem(key) or text_problem(item)) is not None:
            raise ValueError(problem)
    return value


class BatchCreate(BaseModel):
    """The body of POST /v1/batches in OpenAI's form."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    input_file_id: str = Field(min_length=1, max_length=200)
    endpoint: str
    completion_window: Annotated[str, AfterValidator(_window)]
    metadata: Annotated[dict[str, str] | None, AfterValidator(_metadata)] = None


def parse_batch_create(data: Any) -> BatchCreate:
    if not isinstance(data, dict):
        raise InvalidRequest(
            'expected a JSON object like {"input_file_id": "file-...", "endpoint": '
            '"/v1/chat/completions", "completion_window": "24h"}'
        )
    try:
        return BatchCreate.model_validate(data)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            where = key_path(error["loc"])
            if error["type"] == "extra_forbidden":
                problems.append(
                    f"{where}: unknown key (expected input_file_id, endpoint, "
                    "completion_window, metadata)"
                )
            elif error["type"] == "missing":
                problems.append(f"{where}: required key is missing")
            else:
                problems.append(f"{where}: {error['msg'].removeprefix('Value error, ')}")
        raise InvalidRequest("; ".join(problems)) from None


def parse_batch_file(data: bytes, max_lines: int, endpoint: str | None = None) -> list[BatchLine]:
    """A batch input file, strictly: every line a request (unique custom_id, and each url
    `endpoint` when one is given), or InvalidRequest naming the first bad lines. OpenAI
    refuses such a file whole, where a JSONL body's bad lines fail alone (`parse_batch`)."""
    lines = parse_batch(data, max_lines)
    problems = []
    for line in lines:
        if line.error is not None:
            problems.append(f"line {line.line}: {line.error}")
        elif endpoint is not None and line.request is not None and line.request.url != endpoint:
            problems.append(
                f"line {line.line}: url {clipped(line.request.url)!r} is not the batch's "
                f"endpoint {endpoint}; every line of a batch goes to its endpoint"
            )
    if problems:
        shown = "; ".join(problems[:MAX_FILE_PROBLEMS])
        more = len(problems) - MAX_FILE_PROBLEMS
        raise InvalidRequest(
            f"the batch file has {len(problems)} bad lines: {shown}"
            + (f"; and {more} more" if more > 0 else "")
        )
    return lines

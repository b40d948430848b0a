"""What the gateway's errors look like: the exception hierarchy (server.error_middleware maps
each to its status), the one JSON shape of every error answer, and the one way a key path is
written in a message (`replicas[2].url`, `body.messages[0].content`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def error_body(error_type: str, message: str, code: str | None = None) -> dict[str, Any]:
    """The body of every error the gateway answers itself: `{"error": {"type", "message"}}`,
    with OpenAI's `code` where the error has one (which rate limit)."""
    if code is None:
        return {"error": {"type": error_type, "message": message}}
    return {"error": {"type": error_type, "code": code, "message": message}}


MAX_QUOTED_CHARS = 200  # of a client's value quoted back in an error


def clipped(value: str) -> str:
    """A client's value as an error message quotes it: at most MAX_QUOTED_CHARS."""
    return value if len(value) <= MAX_QUOTED_CHARS else value[:MAX_QUOTED_CHARS] + "..."


def key_path(loc: Sequence[int | str]) -> str:
    """A location in a config file or JSON body (a pydantic error's `loc`) as one key path:
    names joined by dots, list positions in brackets; `(top level)` for the document itself."""
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path or "(top level)"


class GatewayError(Exception):
    """An error with an HTTP status and a stable machine-readable type."""

    status = 500
    error_type = "internal_error"
    code: str | None = None  # OpenAI's finer `code`, where there is one

    def __init__(self, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.headers = headers or {}


class NoHealthyReplica(GatewayError):
    status = 503
    error_type = "no_healthy_replica"


class UpstreamError(GatewayError):
    """The chosen replica could not be reached or failed before any byte reached the client."""

    status = 502
    error_type = "upstream_error"


class UpstreamTimeout(UpstreamError):
    status = 504
    error_type = "upstream_timeout"


class ConfigError(GatewayError):
    """A configuration file that cannot be used; the message names the key path (`problems`:
    each problem on its own, where there were several)."""

    status = 422
    error_type = "invalid_config"

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.problems = problems or [message]


class BodyTooLarge(GatewayError):
    status = 413
    error_type = "body_too_large"


class Overloaded(GatewayError):
    """Every slot is taken and the gateway queue is full or timed out: come back later."""

    status = 429
    error_type = "overloaded"


class ClientTimeout(GatewayError):
    status = 408
    error_type = "client_timeout"


class InvalidRequest(GatewayError):
    """A request to one of the gateway's own endpoints that cannot be used as sent."""

    status = 400
    error_type = "invalid_request"


class Unauthorized(GatewayError):
    """No valid API key (config `auth.api_keys`) on a request that needs one."""

    status = 401
    error_type = "unauthorized"

    def __init__(self, message: str) -> None:
        super().__init__(message, {"WWW-Authenticate": "Bearer"})


class NotFound(GatewayError):
    status = 404
    error_type = "not_found"


class Conflict(GatewayError):
    """The request is valid but the resource's state forbids it (e.g. cancelling a done job)."""

    status = 409
    error_type = "conflict"

"""The replica's errors: one exception hierarchy, one error body, one key-path formatter.

Batchers raise `QueueFull` / `QueueTimeout`; request parsing raises `BadRequest` and friends;
the middleware in server.py maps each to its status and `error_body` (the KServe form on /v2),
and a stream that fails after its first byte ends with the same body as an SSE error event.
Every pydantic validation error (config, timing profiles, request bodies) is worded by
`format_validation_error`, so key paths read one way everywhere: `models[0].batcher.max_wait_ms`.
Nothing here imports the rest of the replica: every layer, batching included, may use it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pydantic import ValidationError
    from pydantic_core import ErrorDetails

ROOT = "(root)"


class ReplicaError(Exception):
    status = 500
    type = "internal_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def headers(self) -> dict[str, str]:
        return {}


class BadRequest(ReplicaError):
    status = 400
    type = "invalid_request"


class ModelNotFound(ReplicaError):
    status = 404
    type = "model_not_found"


class IdempotencyKeyReused(ReplicaError):
    """An Idempotency-Key sent again with another request (replica/idempotency.py)."""

    status = 422
    type = "idempotency_key_reused"


class PayloadTooLarge(ReplicaError):
    status = 413
    type = "payload_too_large"


class BodyTimeout(ReplicaError):
    """The client did not send its whole body within server.client_body_s."""

    status = 408
    type = "client_timeout"


class UnsupportedEncoding(ReplicaError):
    """A body with a Content-Encoding the replica does not decode (it decodes none)."""

    status = 415
    type = "unsupported_content_encoding"

    def headers(self) -> dict[str, str]:
        return {"Accept-Encoding": "identity"}  # RFC 9110 12.5.3: what a client may send


class QueueFull(ReplicaError):
    status = 429
    type = "queue_full"

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)}


class QueueTimeout(ReplicaError):
    status = 503
    type = "queue_timeout"


class NotReady(ReplicaError):
    status = 503
    type = "not_ready"


class BatcherClosed(ReplicaError):
    status = 503
    type = "shutting_down"


def error_body(type_: str, message: str) -> dict[str, dict[str, str]]:
    """The replica's error shape (OpenAI's): `{"error": {"type", "message"}}`."""
    return {"error": {"type": type_, "message": message}}


def kserve_error_body(type_: str, message: str) -> dict[str, str]:
    """The same error on /v2 routes: tritonclient and other KServe clients read `error` as a
    string."""
    return {"error": message, "type": type_}


def format_validation_error(error: ValidationError, raw: object) -> str:
    """`path: message` for each of pydantic's errors, joined by `; `; `raw` is the input that
    was validated (the key path is read against it)."""
    return "; ".join(f"{_path_of(e, raw)}: {e['msg']}" for e in error.errors())


def _path_of(error: ErrorDetails, raw: object) -> str:
    return key_path(error["loc"], raw, missing=error["type"] == "missing")


def key_path(loc: Sequence[int | str], raw: object, *, missing: bool = False) -> str:
    """`('models', 1, 'classifier', 'batcher', 'dynamic', 'x')` -> `models[1].batcher.x`.

    Pydantic puts the member of a union that it tried in the location (a discriminator value
    such as `classifier`, or a type such as `list[str]`); the user never wrote those, so a part
    is kept only where `raw` has it. The last part of a `missing` error is the absent key.
    """
    out, node = "", raw
    for i, part in enumerate(loc):
        if isinstance(part, int) and _is_list(node):
            out, node = out + f"[{part}]", _item(node, part)
        elif isinstance(node, Mapping) and part in node:
            out, node = _dotted(out, str(part)), node[part]
        elif missing and i == len(loc) - 1:
            out = _dotted(out, str(part))
    return out or ROOT


def _is_list(node: object) -> bool:
    return isinstance(node, Sequence) and not isinstance(node, str | bytes)


def _item(node: object, index: int) -> object:
    assert isinstance(node, Sequence)
    return node[index] if -len(node) <= index < len(node) else None


def _dotted(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key

"""Replica error hierarchy. One middleware (server.py) maps these to `{"error": {type, message}}`.

Batchers raise `QueueFull` / `QueueTimeout`; request parsing raises `BadRequest` and friends.
"""

from __future__ import annotations


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


class PayloadTooLarge(ReplicaError):
    status = 413
    type = "payload_too_large"


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
    return {"error": {"type": type_, "message": message}}

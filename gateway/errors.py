"""The gateway's exception hierarchy; server.error_middleware maps each to a JSON response."""

from __future__ import annotations


class GatewayError(Exception):
    """An error with an HTTP status and a stable machine-readable type."""

    status = 500
    error_type = "internal_error"

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
    """A configuration file that cannot be used; the message names the key path."""

    status = 422
    error_type = "invalid_config"


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


class NotFound(GatewayError):
    status = 404
    error_type = "not_found"


class Conflict(GatewayError):
    """The request is valid but the resource's state forbids it (e.g. cancelling a done job)."""

    status = 409
    error_type = "conflict"

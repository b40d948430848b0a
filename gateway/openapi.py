"""The OpenAPI document of the gateway's own endpoints, served at /openapi.json.

Every other path is proxied to a replica unchanged; the replica serves its own document.
"""

from __future__ import annotations

from typing import Any

_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["type", "message"],
            "properties": {"type": {"type": "string"}, "message": {"type": "string"}},
        }
    },
}


def _json(description: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": schema or {"type": "object"}}},
    }


def _error(description: str) -> dict[str, Any]:
    return _json(description, {"$ref": "#/components/schemas/Error"})


_REPLICA = {
    "type": "object",
    "properties": {
        "url": {"type": "string"},
        "healthy": {"type": "boolean"},
        "draining": {"type": "boolean"},
        "ejected": {"type": "boolean"},
        "outstanding": {"type": "integer"},
        "outstanding_tokens": {"type": "integer", "description": "estimated work in flight"},
        "max_concurrency": {"type": ["integer", "null"]},
        "requests_total": {"type": "integer"},
        "errors_total": {"type": "integer"},
        "ejections_total": {"type": "integer"},
        "reported": {
            "type": ["object", "null"],
            "description": "the replica's last load report (queued, running, capacity, "
            "backlog_tokens, inflight)",
            "additionalProperties": {"type": "integer"},
        },
        "remote": {"type": "integer", "description": "requests other gateways had there"},
        "latency_ewma_s": {"type": "number", "description": "peak EWMA, seconds per token"},
    },
}
_STATE = {
    "type": "object",
    "properties": {
        "strategy": {"type": "string"},
        "replicas": {"type": "array", "items": {"$ref": "#/components/schemas/Replica"}},
    },
}
_ADMIN_ERRORS = {
    "401": _error("missing or wrong bearer token"),
    "404": _error("admin endpoints are off (INFERGATE_ADMIN_TOKEN unset)"),
}

DOCUMENT: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {
        "title": "infergate gateway",
        "version": "0.1.0",
        "description": "The gateway's own endpoints. Every other path is proxied to a "
        "replica chosen by the routing strategy.",
    },
    "paths": {
        "/healthz": {"get": {"summary": "The process is up", "responses": {"200": _json("up")}}},
        "/readyz": {
            "get": {
                "summary": "At least one replica is healthy and the gateway is not draining",
                "responses": {"200": _json("ready"), "503": _json("not ready")},
            }
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics",
                "responses": {
                    "200": {
                        "description": "text exposition format",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    }
                },
            }
        },
        "/admin/replicas": {
            "get": {
                "summary": "Replica state: health, ejection, outstanding requests, totals",
                "security": [{"bearer": []}],
                "responses": {"200": _json("state", _STATE), **_ADMIN_ERRORS},
            }
        },
        "/admin/reload": {
            "post": {
                "summary": "Reload the config file now",
                "security": [{"bearer": []}],
                "responses": {
                    "200": _json("reloaded", _STATE),
                    "422": _error("the file is invalid; the old config keeps serving"),
                    **_ADMIN_ERRORS,
                },
            }
        },
        "/openapi.json": {
            "get": {"summary": "This document", "responses": {"200": _json("OpenAPI 3 document")}}
        },
        "/ui": {
            "get": {
                "summary": "The status page (HTML; its script polls /ui/status.json)",
                "responses": {
                    "200": {
                        "description": "HTML page",
                        "content": {"text/html": {"schema": {"type": "string"}}},
                    },
                    "404": _error("the status page is off (ui.enabled: false)"),
                },
            }
        },
        "/ui/status.json": {
            "get": {
                "summary": "Replicas, strategy, outstanding counts, recent rate and latency",
                "responses": {
                    "200": _json("status"),
                    "404": _error("the status page is off (ui.enabled: false)"),
                },
            }
        },
    },
    "components": {
        "schemas": {"Error": _ERROR, "Replica": _REPLICA},
        "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
    },
}

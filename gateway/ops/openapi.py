"""The OpenAPI document of the gateway's own endpoints, served at /openapi.json.

Every other path is proxied to a replica unchanged; the replica serves its own document. With
`auth` configured, the jobs endpoints (and every proxied path) need an API key.
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
            "backlog_tokens, inflight, kv_usage, prefix_cache_queried_tokens, "
            "prefix_cache_hit_tokens)",
            "additionalProperties": {"type": "number"},
        },
        "remote": {"type": "integer", "description": "requests other gateways had there"},
        "kv_usage": {
            "type": ["number", "null"],
            "description": "share of the replica's KV blocks held by sequences, 0-1",
        },
        "cache_hit_ratio": {
            "type": ["number", "null"],
            "description": "prompt tokens served from its prefix cache over those looked up",
        },
        "latency_ewma_s": {"type": "number", "description": "peak EWMA, seconds per token"},
        "models": {
            "type": ["array", "null"],
            "items": {"type": "string"},
            "description": "the models it serves (its /v1/models or the config); null: unknown, "
            "so it may serve any",
        },
        "model_load": {
            "type": ["object", "null"],
            "additionalProperties": {"type": "integer"},
            "description": "requests in flight per model label, from the engine's metrics",
        },
    },
}
_STATE = {
    "type": "object",
    "properties": {
        "strategy": {"type": "string"},
        "replicas": {"type": "array", "items": {"$ref": "#/components/schemas/Replica"}},
    },
}
_RESULT_FIELDS: dict[str, Any] = {
    "id": {"type": "string"},
    "custom_id": {"type": ["string", "null"]},
    "response": {
        "type": ["object", "null"],
        "properties": {"status_code": {"type": "integer"}, "body": {}},
    },
    "error": {
        "type": ["object", "null"],
        "properties": {"code": {"type": "string"}, "message": {"type": "string"}},
    },
}
_JOB: dict[str, Any] = {
    "type": "object",
    "properties": {
        **_RESULT_FIELDS,
        "object": {"const": "job"},
        "status": {"enum": ["queued", "running", "succeeded", "failed", "cancelled"]},
        "method": {"type": "string"},
        "url": {"type": "string"},
        "batch_id": {"type": ["string", "null"]},
        "attempts": {"type": "integer"},
        "created_at": {"type": "integer"},
        "started_at": {"type": ["integer", "null"]},
        "finished_at": {"type": ["integer", "null"]},
        "expires_at": {"type": ["integer", "null"]},
    },
}
_JOB_REQUEST = {
    "type": "object",
    "required": ["url", "body"],
    "properties": {
        "url": {
            "type": "string",
            "pattern": "^/[!-~]*$",
            "description": "the replica path, e.g. /v1/completions",
        },
        "body": {"type": "object", "description": "the JSON request that path accepts"},
        "method": {"const": "POST"},
        "custom_id": {"type": "string", "minLength": 1, "maxLength": 512},
    },
    "additionalProperties": False,
}
_BATCH = {
    "type": "object",
    "properties": {
        "id": {"type": "string"},
        "object": {"const": "batch"},
        "status": {"enum": ["in_progress", "cancelling", "cancelled", "completed", "expired"]},
        "endpoint": {"type": ["string", "null"]},
        "input_file_id": {"type": ["string", "null"]},
        "completion_window": {"type": ["string", "null"]},
        "output_file_id": {"type": ["string", "null"]},
        "error_file_id": {"type": ["string", "null"]},
        "metadata": {"type": ["object", "null"], "additionalProperties": {"type": "string"}},
        "request_counts": {
            "type": "object",
            "properties": {
                k: {"type": "integer"}
                for k in ("total", "completed", "failed", "queued", "running")
            },
        },
        "results_url": {"type": "string"},
        "created_at": {"type": "integer"},
        "completed_at": {"type": ["integer", "null"]},
        "cancelled_at": {"type": ["integer", "null"]},
        "expires_at": {"type": ["integer", "null"]},
    },
}
# gateway/jobs/model.py's BATCH_ENDPOINTS (jobs/ is above ops/: it cannot be imported here;
# tests/unit/gateway/test_openapi_batches.py checks they agree).
BATCH_ENDPOINTS = ["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses",
                   "/v1/moderations"]  # fmt: skip
_BATCH_CREATE = {
    "type": "object",
    "required": ["input_file_id", "endpoint", "completion_window"],
    "properties": {
        "input_file_id": {"type": "string", "description": "a file uploaded with purpose batch"},
        "endpoint": {"enum": BATCH_ENDPOINTS},
        "completion_window": {
            "type": "string",
            "pattern": "^[1-9][0-9]{0,6}[smh]$",
            "description": '"24h" (or a duration from 1s to 168h)',
        },
        "metadata": {
            "type": ["object", "null"],
            "maxProperties": 16,
            "additionalProperties": {"type": "string", "maxLength": 512},
        },
    },
    "additionalProperties": False,
}
_FILE = {
    "type": "object",
    "properties": {
        "id": {"type": "string"},
        "object": {"const": "file"},
        "bytes": {"type": "integer"},
        "created_at": {"type": "integer"},
        "expires_at": {"type": ["integer", "null"]},
        "filename": {"type": "string"},
        "purpose": {"enum": ["batch", "batch_output"]},
    },
}
_ID = [{"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}]
_PAGE = [
    {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 1000}},
    {"name": "after", "in": "query", "schema": {"type": "string"}},
]
_OFF = {"404": _error("unknown id, or jobs are off (no 'jobs:' section in the config)")}


def _list_of(ref: str) -> dict[str, Any]:
    items = {"type": "array", "items": {"$ref": f"#/components/schemas/{ref}"}}
    return {"type": "object", "properties": {"data": items, "has_more": {"type": "boolean"}}}


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


_JOB_PATHS: dict[str, Any] = {
    "/v1/jobs": {
        "post": {
            "summary": "Submit a deferred job; it runs when a replica has spare capacity",
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": _ref("JobRequest")}},
            },
            "responses": {
                "202": _json("queued; Location: /v1/jobs/{id}", _ref("Job")),
                "400": _error("not a valid job: the message says what to fix"),
                "413": _error("body over limits.max_body_bytes"),
                **_OFF,
            },
        },
        "get": {
            "summary": "List jobs, oldest first",
            "parameters": [
                {"name": "status", "in": "query", "schema": _JOB["properties"]["status"]},
                {"name": "batch_id", "in": "query", "schema": {"type": "string"}},
                *_PAGE,
            ],
            "responses": {
                "200": _json("a page", _list_of("Job")),
                "400": _error("bad query"),
                **_OFF,
            },
        },
    },
    "/v1/jobs/{id}": {
        "get": {
            "summary": "A job, with its result when done",
            "parameters": _ID,
            "responses": {"200": _json("the job", _ref("Job")), **_OFF},
        },
        "delete": {
            "summary": "Cancel a queued or running job",
            "parameters": _ID,
            "responses": {
                "200": _json("cancelled", _ref("Job")),
                "409": _error("the job already finished"),
                **_OFF,
            },
        },
    },
    "/v1/batches": {
        "post": {
            "summary": "Create a batch from an uploaded file (OpenAI's batches.create), or "
            "submit a JSONL batch file as the body, one OpenAI Batch request per line",
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {"schema": _BATCH_CREATE},
                    "application/jsonl": {"schema": {"type": "string"}},
                    "text/plain": {"schema": {"type": "string"}},
                },
            },
            "responses": {
                "200": _json("created from the file; Location: /v1/batches/{id}", _ref("Batch")),
                "202": _json("accepted; Location: /v1/batches/{id}", _ref("Batch")),
                "400": _error("empty, or over jobs.max_batch_lines"),
                "413": _error("over jobs.max_batch_bytes"),
                **_OFF,
            },
        },
        "get": {
            "summary": "List batches, oldest first",
            "parameters": _PAGE,
            "responses": {
                "200": _json("a page", _list_of("Batch")),
                "400": _error("bad query"),
                **_OFF,
            },
        },
    },
    "/v1/batches/{id}": {
        "get": {
            "summary": "A batch and its progress counts",
            "parameters": _ID,
            "responses": {"200": _json("the batch", _ref("Batch")), **_OFF},
        }
    },
    "/v1/batches/{id}/results": {
        "get": {
            "summary": "The result file: one JSONL line per input line, in file order",
            "parameters": _ID,
            "responses": {
                "200": {
                    "description": "JSONL: {id, custom_id, response, error} per line",
                    "content": {"application/jsonl": {"schema": {"type": "string"}}},
                },
                "409": _error("the batch is still in progress"),
                **_OFF,
            },
        }
    },
    "/v1/batches/{id}/cancel": {
        "post": {
            "summary": "Cancel the batch's queued and running lines",
            "parameters": _ID,
            "responses": {
                "200": _json("cancelled", _ref("Batch")),
                "409": _error("the batch already finished"),
                **_OFF,
            },
        }
    },
    "/v1/files": {
        "post": {
            "summary": "Upload a batch input file (OpenAI's files.create, purpose batch)",
            "requestBody": {
                "required": True,
                "content": {
                    "multipart/form-data": {
                        "schema": {
                            "type": "object",
                            "required": ["file", "purpose"],
                            "properties": {
                                "file": {"type": "string", "format": "binary"},
                                "purpose": {"const": "batch"},
                            },
                        }
                    }
                },
            },
            "responses": {
                "200": _json("stored", _ref("File")),
                "400": _error("not a JSONL file of requests, or a bad form"),
                "413": _error("over jobs.max_batch_bytes"),
                **_OFF,
            },
        },
        "get": {
            "summary": "List files, newest first",
            "parameters": [
                {"name": "purpose", "in": "query", "schema": {"enum": ["batch", "batch_output"]}},
                {"name": "order", "in": "query", "schema": {"enum": ["asc", "desc"]}},
                {
                    "name": "limit",
                    "in": "query",
                    "schema": {"type": "integer", "minimum": 1, "maximum": 10000},
                },
                {"name": "after", "in": "query", "schema": {"type": "string"}},
            ],
            "responses": {
                "200": _json("a page", _list_of("File")),
                "400": _error("bad query"),
                **_OFF,
            },
        },
    },
    "/v1/files/{id}": {
        "get": {
            "summary": "A file's metadata",
            "parameters": _ID,
            "responses": {"200": _json("the file", _ref("File")), **_OFF},
        },
        "delete": {
            "summary": "Delete a file",
            "parameters": _ID,
            "responses": {"200": _json("deleted", {"type": "object"}), **_OFF},
        },
    },
    "/v1/files/{id}/content": {
        "get": {
            "summary": "A file's bytes: an upload as sent, a batch's output or error file as JSONL",
            "parameters": _ID,
            "responses": {
                "200": {
                    "description": "the file",
                    "content": {
                        "application/octet-stream": {"schema": {"type": "string"}},
                        "application/jsonl": {"schema": {"type": "string"}},
                    },
                },
                **_OFF,
            },
        }
    },
}
# Optional: only when the config has `auth` (an empty requirement means "none needed").
_API_KEY: list[dict[str, list[str]]] = [{"apiKey": []}, {}]
_UNAUTHORIZED = {"401": _error("auth is on and the request carries no valid API key")}


_MODEL_CARD: dict[str, Any] = {
    "type": "object",
    "required": ["id", "object"],
    "properties": {
        "id": {"type": "string"},
        "object": {"type": "string", "enum": ["model"]},
        "created": {"type": "integer"},
        "owned_by": {"type": "string"},
        "parent": {"type": "string", "description": "an alias's served model"},
    },
}
_MODEL_PATHS: dict[str, Any] = {
    "/v1/models": {
        "get": {
            "summary": "OpenAI's model list: what the replicas in rotation serve, and the aliases",
            "responses": {
                "200": _json(
                    "the models",
                    {
                        "type": "object",
                        "properties": {
                            "object": {"type": "string"},
                            "data": {"type": "array", "items": _MODEL_CARD},
                        },
                    },
                )
            },
        }
    },
    "/v1/models/{model}": {
        "get": {
            "summary": "One model's card",
            "parameters": [
                {"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}
            ],
            "responses": {
                "200": _json("the model", _MODEL_CARD),
                "404": _error("no replica serves it (type model_not_found)"),
                "503": _error("replicas serve it, none is in rotation"),
            },
        }
    },
}


def _with_api_key(paths: dict[str, Any]) -> dict[str, Any]:
    return {
        path: {
            method: {
                **operation,
                "security": _API_KEY,
                "responses": {**operation["responses"], **_UNAUTHORIZED},
            }
            for method, operation in operations.items()
        }
        for path, operations in paths.items()
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
        "replica chosen by the routing strategy; with `auth` configured, it and the jobs "
        "endpoints need `Authorization: Bearer <API key>`.",
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
        **_with_api_key(_MODEL_PATHS),
        **_with_api_key(_JOB_PATHS),
    },
    "components": {
        "schemas": {
            "Error": _ERROR,
            "Replica": _REPLICA,
            "Job": _JOB,
            "JobRequest": _JOB_REQUEST,
            "Batch": _BATCH,
            "File": _FILE,
        },
        "securitySchemes": {
            "bearer": {"type": "http", "scheme": "bearer", "description": "the admin token"},
            "apiKey": {"type": "http", "scheme": "bearer", "description": "auth.api_keys"},
        },
    },
}

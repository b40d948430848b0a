"""The OpenAPI document of the replica's HTTP API, served at /openapi.json.

The completion and chat completion request schemas are generated from the pydantic models the
routes validate with, so the document cannot drift from what is accepted.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from aiohttp import web

from replica.api.schemas import ChatCompletionRequest, CompletionRequest

routes = web.RouteTableDef()

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
# KServe clients read `error` as a string, so /v2 errors take that form.
_KSERVE_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {"type": "string"}, "type": {"type": "string"}},
}
_TENSOR = {
    "type": "object",
    "required": ["name", "shape", "datatype", "data"],
    "properties": {
        "name": {"type": "string"},
        "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
        "datatype": {"type": "string"},
        "data": {"type": "array", "items": {"type": "number"}},
        "parameters": {"type": "object"},
    },
}
_INFER = {
    "type": "object",
    "required": ["inputs"],
    "properties": {
        "id": {"type": "string"},
        "inputs": {"type": "array", "items": {"$ref": "#/components/schemas/Tensor"}},
        "outputs": {"type": "array", "items": {"type": "object"}},
        "parameters": {"type": "object"},
    },
}


def _json(description: str, ref: str | None = None) -> dict[str, Any]:
    schema = {"$ref": f"#/components/schemas/{ref}"} if ref else {"type": "object"}
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _body(ref: str) -> dict[str, Any]:
    schema = {"$ref": f"#/components/schemas/{ref}"}
    return {"required": True, "content": {"application/json": {"schema": schema}}}


_ERRORS = {
    "400": _json("bad input; the message names the field", "Error"),
    "404": _json("unknown model", "Error"),
    "413": _json("body too large", "Error"),
    "429": _json("queue full; see Retry-After", "Error"),
    "503": _json("loading, draining or queue timeout", "Error"),
}
_KSERVE_ERRORS = {code: _json(r["description"], "KServeError") for code, r in _ERRORS.items()}
_MODEL = {
    "name": "name",
    "in": "path",
    "required": True,
    "schema": {"type": "string"},
    "example": "classifier",
}


def _get(summary: str) -> dict[str, Any]:
    return {
        "get": {"summary": summary, "responses": {"200": _json("ok"), "503": _json("not ready")}}
    }


@cache
def document() -> dict[str, Any]:
    ref = "#/components/schemas/{model}"
    completion = CompletionRequest.model_json_schema(ref_template=ref)
    chat = ChatCompletionRequest.model_json_schema(ref_template=ref)
    defs = completion.pop("$defs", {}) | chat.pop("$defs", {})
    return {
        "openapi": "3.1.0",
        "info": {"title": "infergate replica", "version": "0.1.0"},
        "paths": {
            "/ping": _get("SageMaker health: 200 when ready"),
            "/health": _get("vLLM/SGLang-style health: 200 when ready"),
            "/v2/health/ready": _get("KServe readiness"),
            "/v2/health/live": _get("KServe liveness"),
            "/load": _get("Queued and running work, and capacity"),
            "/v1/models": _get("OpenAI model list (generative: max_model_len, max_tokens_limit)"),
            "/cache/blocks": {
                "get": {
                    "summary": "The prefix cache's block hashes (hash scheme and block size "
                    "included), at most one per KV block",
                    "parameters": [
                        {
                            "name": "model",
                            "in": "query",
                            "required": False,
                            "schema": {"type": "string"},
                            "example": "tiny-gpt",
                        },
                    ],
                    "responses": {"200": _json("cached block hashes"), **_ERRORS},
                }
            },
            "/v1/completions": {
                "post": {
                    "summary": "OpenAI text completion (SSE with stream: true)",
                    "requestBody": _body("CompletionRequest"),
                    "responses": {"200": _json("completion"), **_ERRORS},
                }
            },
            "/v1/chat/completions": {
                "post": {
                    "summary": "OpenAI chat completion (SSE with stream: true)",
                    "requestBody": _body("ChatCompletionRequest"),
                    "responses": {"200": _json("chat completion"), **_ERRORS},
                }
            },
            "/tokenize": {
                "post": {
                    "summary": "vLLM's tokenize: a completion or chat body as token ids",
                    "requestBody": _body("CompletionRequest"),
                    "responses": {"200": _json("{tokens, count, max_model_len}"), **_ERRORS},
                }
            },
            "/invocations": {
                "post": {
                    "summary": "SageMaker entry point: a completion or chat completion body "
                    "(`messages`), or a KServe body with `inputs`",
                    "requestBody": _body("CompletionRequest"),
                    "responses": {"200": _json("result"), **_ERRORS},
                }
            },
            "/v2/models/{name}": {
                "get": {
                    "summary": "KServe model metadata",
                    "parameters": [_MODEL],
                    "responses": {"200": _json("metadata"), **_KSERVE_ERRORS},
                }
            },
            "/v2/models/{name}/infer": {
                "post": {
                    "summary": "KServe v2 inference",
                    "parameters": [_MODEL],
                    "requestBody": _body("InferRequest"),
                    "responses": {"200": _json("outputs"), **_KSERVE_ERRORS},
                }
            },
            "/openapi.json": {
                "get": {
                    "summary": "This document",
                    "responses": {"200": _json("OpenAPI 3 document")},
                }
            },
        },
        "components": {
            "schemas": {
                "CompletionRequest": completion,
                "ChatCompletionRequest": chat,
                **defs,
                "Tensor": _TENSOR,
                "InferRequest": _INFER,
                "Error": _ERROR,
                "KServeError": _KSERVE_ERROR,
            }
        },
    }


@routes.get("/openapi.json")
async def openapi(request: web.Request) -> web.Response:
    return web.json_response(document())

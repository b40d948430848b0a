"""Request schemas for the OpenAI completions API, and JSON-body parsing shared by all routes.

Types are strict (a string is not an int); unknown OpenAI fields are ignored so newer clients
work. Every error message starts with the offending field.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from replica.errors import BadRequest, format_validation_error


def parse_json_object(body: bytes) -> dict[str, Any]:
    try:
        value = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise BadRequest(f"body is not valid JSON: {error}") from None
    if not isinstance(value, dict):
        raise BadRequest(f"body must be a JSON object, got {type(value).__name__}")
    return value


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, frozen=True)
    include_usage: bool = False


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, frozen=True)

    model: str | None = None
    prompt: str | list[str] = Field(min_length=1)
    max_tokens: int = Field(default=16, gt=0)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1, le=1)

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    @property
    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


def parse_completion(body: dict[str, Any]) -> CompletionRequest:
    if "prompt" not in body:
        raise BadRequest("prompt: field required (a string or a list of strings)")
    try:
        return CompletionRequest.model_validate(body)
    except ValidationError as error:
        raise BadRequest(format_validation_error(error, body)) from None

"""Request schemas for OpenAI's completions and chat completions (the body itself is parsed
by replica/api/body.py).

Types are strict (a string is not an int); unknown OpenAI fields are ignored so newer clients
work. Every error message starts with the offending field.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from replica.errors import BadRequest, format_validation_error
from replica.models.chat_template import Role, apply_chat_template

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for completions


def _utf8(text: str) -> str:
    """JSON may spell a lone surrogate (`"\\ud800"`); the byte tokenizer cannot encode one."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValueError(f"not valid Unicode: {error.reason} at {error.start}") from None
    return text


Text = Annotated[str, AfterValidator(_utf8)]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, frozen=True)
    include_usage: bool = False


class OpenAIRequest(BaseModel):
    """The fields OpenAI's completions and chat completions share: model, sampling, streaming.
    A subclass says which field holds its input and which bounds the tokens to generate."""

    model_config = ConfigDict(extra="ignore", strict=True, frozen=True)
    input_field: ClassVar[str]

    model: str | None = None
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**63)  # OpenAI's: a 64-bit int
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1, le=1)

    @property
    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def prompts(self) -> list[str]:
        """The texts to complete, one generation each."""
        raise NotImplementedError

    @property
    def budget(self) -> tuple[str, int]:
        """The field that bounds the tokens to generate (as errors name it), and its value."""
        raise NotImplementedError


class CompletionRequest(OpenAIRequest):
    input_field: ClassVar[str] = "prompt"

    prompt: Text | list[Text] = Field(min_length=1)
    max_tokens: int = Field(default=DEFAULT_MAX_TOKENS, gt=0)

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    @property
    def budget(self) -> tuple[str, int]:
        return "max_tokens", self.max_tokens


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, frozen=True)
    type: Literal["text"]
    text: Text


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, frozen=True)
    role: Role
    content: Text | list[TextPart]

    @property
    def text(self) -> str:
        """The content as one string: text parts are joined with no separator, as OpenAI does."""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(OpenAIRequest):
    input_field: ClassVar[str] = "messages"

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, gt=0)  # deprecated by OpenAI, still sent
    max_completion_tokens: int | None = Field(default=None, gt=0)

    @property
    def budget(self) -> tuple[str, int]:
        if self.max_completion_tokens is not None:
            return "max_completion_tokens", self.max_completion_tokens
        return "max_tokens", self.max_tokens or DEFAULT_MAX_TOKENS

    @property
    def prompts(self) -> list[str]:
        """The conversation through the chat template (replica/models/chat_template.py)."""
        return [apply_chat_template((m.role, m.text) for m in self.messages)]


Request = TypeVar("Request", bound=OpenAIRequest)


def parse_completion(body: dict[str, Any]) -> CompletionRequest:
    if "prompt" not in body:
        raise BadRequest("prompt: field required (a string or a list of strings)")
    return _validate(CompletionRequest, body)


def parse_chat_completion(body: dict[str, Any]) -> ChatCompletionRequest:
    if "messages" not in body:
        raise BadRequest("messages: field required (a list of {role, content} objects)")
    return _validate(ChatCompletionRequest, body)


def _validate(schema: type[Request], body: dict[str, Any]) -> Request:
    try:
        return schema.model_validate(body)
    except ValidationError as error:
        raise BadRequest(format_validation_error(error, body)) from None

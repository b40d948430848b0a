"""When a streamed completion counts as complete, for every load generator (Locust users, the
open-loop driver, the chaos drills).

A stream succeeded only if it ended with `data: [DONE]` and carried no error event: neither an
`event: error` field (the gateway's cut, the replica's mid-stream failure) nor a `data:` payload
with an `error` key (OpenAI's form). Feed it the stream's lines as they arrive.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any


@dataclass
class StreamCheck:
    done: bool = False  # `data: [DONE]` arrived
    error: str | None = None  # what the first error event said
    tokens: int = 0  # completion tokens: one per chunk with text (engines send one per chunk)
    _event: str = ""  # the `event:` field of the event being read

    @property
    def ok(self) -> bool:
        return self.done and self.error is None

    def feed(self, line: bytes) -> bool:
        """Read one line of the stream; True when it was a completion chunk (the first one
        marks time to first token)."""
        line = line.rstrip(b"\r\n")
        if not line:
            self._event = ""  # a blank line ends an event
        elif line.startswith(b"event:"):
            self._event = _value(line[6:]).decode(errors="replace")
        elif line.startswith(b"data:"):
            return self._data(_value(line[5:]))
        return False

    def _data(self, data: bytes) -> bool:
        if data == b"[DONE]":
            self.done = True
            return False
        payload = _json(data)
        if payload is None:
            self._fail(f"unreadable data event: {data[:80]!r}")
        elif self._event == "error" or "error" in payload:
            self._fail(_message(payload.get("error")))
        else:
            choices = payload.get("choices") or ()
            texts = sum(1 for c in choices if isinstance(c, dict) and _text(c))
            self.tokens += texts
            return bool(texts)  # a chat stream's role-only first delta carries no token
        return False

    def _fail(self, reason: str) -> None:
        self.error = self.error or reason


def _text(choice: dict[str, Any]) -> str:
    """A completion chunk's text, or a chat chunk's delta content."""
    delta = choice.get("delta")
    content = delta.get("content") if isinstance(delta, dict) else None
    return str(choice.get("text") or content or "")


def _value(field: bytes) -> bytes:
    return field[1:] if field.startswith(b" ") else field


def _json(data: bytes) -> dict[str, Any] | None:
    try:
        payload = json.loads(data)
    except ValueError:
        return None
    return payload if isinstance(payload, dict) else None


def _message(error: object) -> str:
    if isinstance(error, dict):
        return str(error.get("message") or error.get("type") or "error event")
    return str(error or "error event")

"""A relayed event stream read by its framing as it passes: the tokens streamed (each shrinks
the request's counted work), whether the replica ended it with an error event, and, where
asked, the usage its last chunk reports."""

from __future__ import annotations

import json

from gateway.datapath.usage import usage_in
from gateway.flow.service import Usage

SSE_MAX_LINE = 64 * 1024  # of an event's data, and of a line held across chunks


class SseCounter:
    """A relayed event stream read by its framing, chunk by chunk as it passes (lines end in
    LF, CRLF or CR, split anywhere; a blank line ends an event). `feed` returns the `data:`
    lines in a chunk: one a token in an OpenAI stream, the final `[DONE]` included (the count
    only lowers an estimate that was an upper bound). `failed` turns true once an event is an
    error: it has `event: error`, or its data is a JSON object with a top-level "error" (OpenAI,
    vLLM, TGI) or `"object": "error"` (vLLM's older streams). What a model writes sits inside
    a data value, so no text it outputs can count as an event or fail the stream."""

    __slots__ = (
        "_data", "_error_event", "_partial", "_size", "_skip_lf", "_suspect", "_wants_usage",
        "failed", "usage",
    )  # fmt: skip

    def __init__(self, wants_usage: bool = False) -> None:
        self._partial = b""  # a line not yet ended, carried to the next chunk
        self._skip_lf = False  # the last chunk ended in CR: an LF opening this one ends that line
        self._error_event = False
        self._suspect = False  # a data line names "error": the event's data is parsed at its end
        self._data: list[bytes] = []
        self._size = 0
        self.failed = False
        self._wants_usage = wants_usage  # look for a `usage` object in the events
        self.usage: Usage | None = None  # the last one seen

    def feed(self, chunk: bytes) -> int:
        if (  # the usual chunk: whole LF-ended events naming no error, after whole ones
            chunk[-2:] == b"\n\n"
            and not (self._partial or self._size or self._error_event)
            and b"\r" not in chunk
            and b"error" not in chunk
            and not (self._wants_usage and b'"usage"' in chunk)
        ):
            self._skip_lf = False
            return chunk.count(b"\ndata:") + chunk.startswith(b"data:")
        if self._skip_lf and chunk[:1] == b"\n":
            chunk = chunk[1:]
        self._skip_lf = chunk[-1:] == b"\r"
        text = self._partial + chunk if self._partial else chunk
        lines = text.splitlines()
        self._partial = b""
        if lines and text[-1:] not in (b"\n", b"\r"):
            self._partial = lines.pop()[:SSE_MAX_LINE]  # enough to know the field
        count = 0
        for line in lines:
            if not line:
                self._dispatch()
            elif line.startswith(b"data:"):
                count += 1
                self._add_data(line[5:].removeprefix(b" "))
            elif line.startswith(b"event:"):
                self._error_event = line[6:].removeprefix(b" ") == b"error"
        return count

    def _add_data(self, value: bytes) -> None:
        self._size += len(value) + 1
        if self._size <= SSE_MAX_LINE:  # an error object is small; a larger event is none
            self._data.append(value)
            self._suspect = (
                self._suspect
                or b'"error"' in value
                or (self._wants_usage and b'"usage"' in value and not _null_usage(value))
            )

    def _dispatch(self) -> None:
        if self._suspect and not self._error_event:
            payload = _parsed(b"\n".join(self._data))
            if _is_error_object(payload):
                self.failed = True
            elif self._wants_usage:
                self.usage = usage_in(payload) or self.usage
        elif self._error_event:
            self.failed = True
        self._error_event = self._suspect = False
        self._data.clear()
        self._size = 0


def _null_usage(value: bytes) -> bool:
    """An event with `"usage": null` (every chunk but the last, in vLLM's streams)."""
    return b'"usage":null' in value or b'"usage": null' in value


def _parsed(data: bytes) -> object:
    try:
        return json.loads(data)
    except (ValueError, RecursionError):
        return None


def _is_error_object(payload: object) -> bool:
    if not isinstance(payload, dict):
        return False
    return payload.get("error") is not None or payload.get("object") == "error"

"""A relayed event stream read by its framing as it passes: the tokens streamed (each shrinks
the request's counted work) and whether the replica ended it with an error event."""

from __future__ import annotations

import json

SSE_MAX_LINE = 64 * 1024  # of an event's data, and of a line held across chunks


class SseCounter:
    """A relayed event stream read by its framing, chunk by chunk as it passes (lines end in
    LF, CRLF or CR, split anywhere; a blank line ends an event). `feed` returns the `data:`
    lines in a chunk: one a token in an OpenAI stream, the final `[DONE]` included (the count
    only lowers an estimate that was an upper bound). `failed` turns true once an event is an
    error: it has `event: error`, or its data is a JSON object with a top-level "error" (OpenAI,
    vLLM, TGI) or `"object": "error"` (vLLM's older streams). What a model writes sits inside
    a data value, so no text it outputs can count as an event or fail the stream."""

    __slots__ = ("_data", "_error_event", "_partial", "_size", "_skip_lf", "_suspect", "failed")

    def __init__(self) -> None:
        self._partial = b""  # a line not yet ended, carried to the next chunk
        self._skip_lf = False  # the last chunk ended in CR: an LF opening this one ends that line
        self._error_event = False
        self._suspect = False  # a data line names "error": the event's data is parsed at its end
        self._data: list[bytes] = []
        self._size = 0
        self.failed = False

    def feed(self, chunk: bytes) -> int:
        if (  # the usual chunk: whole LF-ended events naming no error, after whole ones
            chunk[-2:] == b"\n\n"
            and not (self._partial or self._size or self._error_event)
            and b"\r" not in chunk
            and b"error" not in chunk
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
            self._suspect = self._suspect or b'"error"' in value

    def _dispatch(self) -> None:
        if self._error_event or (self._suspect and _is_error_object(b"\n".join(self._data))):
            self.failed = True
        self._error_event = self._suspect = False
        self._data.clear()
        self._size = 0


def _is_error_object(data: bytes) -> bool:
    try:
        payload = json.loads(data)
    except (ValueError, RecursionError):
        return False
    if not isinstance(payload, dict):
        return False
    return payload.get("error") is not None or payload.get("object") == "error"

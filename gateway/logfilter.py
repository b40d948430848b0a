"""A client's malformed HTTP: its log records made safe to keep, and its answer in our JSON shape.

aiohttp logs its parser's errors (bare LF, control bytes, an over-long line, bad chunk framing,
an invalid URL) with a traceback that quotes the request's bytes, and those carry API keys and
the admin token: `MalformedRequestFilter` is installed on the root log handlers by the gateway's
and the replica's command lines (both processes face clients). aiohttp also answers such a
request itself, before any middleware, in plain text: `answer_in_json` makes a server answer it
as every other error, `{"error": {"type", "message"}}`, naming the parser's reason alone.

Small and free of the rest of the gateway, so the replica imports it too."""

from __future__ import annotations

import asyncio
import logging
import re
from http import HTTPStatus

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from gateway.errors import error_body


class MalformedRequestFilter(logging.Filter):
    """A record whose exception is (or was caused by) the HTTP parser's error becomes one line
    naming the error's class and a short reason, the bytes left out; the client's fault,
    answered 400, so at most a warning."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = _http_error(record.exc_info[1] if record.exc_info else None)
        if error is not None:
            level = min(record.levelno, logging.WARNING)
            record.args = (record.getMessage(), type(error).__name__, _reason(error))
            record.msg = "%s: malformed request: %s: %s"
            record.levelno, record.levelname = level, logging.getLevelName(level)
            record.exc_info, record.exc_text, record.stack_info = None, None, None
        return True


def _http_error(error: BaseException | None) -> HttpProcessingError | None:
    """The HTTP parser's error behind a logged exception, however deep in its chain."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, HttpProcessingError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


# A reason as aiohttp words one ("Invalid header value char", "Got more than 8190 bytes (8195)"):
# a capitalised word, then words of letters or numbers. Its pure-Python parser makes a bad
# chunk-size line the message itself, and a key is never letters alone in practice.
PHRASE = re.compile(r"[A-Z][a-z]+(?: (?:[`A-Za-z]+|\(?[0-9]+\)?)[.,]?)+")


def _reason(error: HttpProcessingError) -> str:
    """`Invalid header value char`, not what follows: the parser quotes the bytes after a ':'
    (or in quotes) on the first line or below it; a message that is no phrase is left out."""
    reason = re.split(r"[:'\"\n]", error.message or "", maxsplit=1)[0].strip()
    return reason[:80] if PHRASE.fullmatch(reason) else f"status {error.code}"


def filter_malformed_requests() -> None:
    """Install the filter on the root logger's handlers (after logging.basicConfig): on the
    handlers, so every logger's records pass it (aiohttp.server, .web, .access, ours)."""
    for handler in logging.getLogger().handlers:
        handler.addFilter(MalformedRequestFilter())


def answer_in_json(server: web.Server) -> None:
    """Every connection `server` takes answers what aiohttp answers itself (a request its
    parser refuses, a handler past its time) in our JSON error shape: same status, the
    parser's reason as the message (never the request's bytes), connection closed. (aiohttp
    makes each connection's handler itself, a plain RequestHandler: it becomes the subclass
    below as it connects, which adds no state.)"""
    accept = server.connection_made

    def connection_made(handler: web.RequestHandler, transport: asyncio.Transport) -> None:
        handler.__class__ = JsonErrorHandler
        accept(handler, transport)

    server.connection_made = connection_made  # type: ignore[method-assign]


class JsonErrorHandler(web.RequestHandler):
    __slots__ = ()

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        super().handle_error(request, status, exc, message)  # logs it; raises if one had begun
        error = _http_error(exc)
        if error is not None:
            reason = _reason(error)
            if reason.startswith("status "):  # (no phrase to quote: see _reason)
                reason = "the request line or a header is not valid HTTP/1.1"
            text = f"malformed HTTP request: {reason}"
        else:
            text = f"{status} {HTTPStatus(status).phrase}"
        kind = "invalid_request" if status < 500 else "internal_error"
        answer = web.json_response(error_body(kind, text), status=status)
        answer.force_close()
        return answer

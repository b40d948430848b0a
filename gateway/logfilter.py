"""Log records of a client's malformed HTTP, made safe to keep: aiohttp logs its parser's errors
(bare LF, control bytes, an over-long line, bad chunk framing, an invalid URL) with a traceback
that quotes the request's bytes, and those carry API keys and the admin token. Installed on the
root log handlers by the gateway's and the replica's command lines (both processes face clients).

Small and free of the rest of the gateway, so the replica imports it too."""

from __future__ import annotations

import logging
import re

from aiohttp.http_exceptions import HttpProcessingError


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

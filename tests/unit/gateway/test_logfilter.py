"""MalformedRequestFilter: a record of aiohttp's parser error keeps its class and a short
reason, never the request's bytes, whichever parser (C or pure Python) worded the error."""

from __future__ import annotations

import logging
import sys

import pytest
from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage, HttpProcessingError, TransferEncodingError

from gateway.logfilter import MalformedRequestFilter

SECRET = "sk-FILTERSECRET-0c1d"


def _record(error: BaseException) -> logging.LogRecord:
    try:
        raise error
    except BaseException:
        exc_info = sys.exc_info()
    return logging.LogRecord(
        "aiohttp.server", logging.ERROR, __file__, 1, "Error handling request from %s",
        ("127.0.0.1",), exc_info,
    )  # fmt: skip


def _caused(outer: BaseException, cause: BaseException) -> BaseException:
    outer.__cause__ = cause
    return outer


@pytest.mark.parametrize(
    ("error", "shown"),
    [
        (BadHttpMessage(f"Invalid header value char:\n\n  b'Bearer {SECRET}\\x01'"),
         "BadHttpMessage: Invalid header value char"),
        (TransferEncodingError(f"zz{SECRET}"), "TransferEncodingError: status 400"),
        (TransferEncodingError(f"Zz Bearer{SECRET}"), "TransferEncodingError: status 400"),
        (TransferEncodingError("Chunk size mismatch"),
         "TransferEncodingError: Chunk size mismatch"),
        (BadHttpMessage("Got more than 8190 bytes (8195) when reading b'x'"),
         "BadHttpMessage: Got more than 8190 bytes (8195) when reading b"),
        (_caused(web.RequestPayloadError(f"zz{SECRET}"), TransferEncodingError(f"zz{SECRET}")),
         "TransferEncodingError: status 400"),
    ],
)  # fmt: skip
def test_a_parser_error_is_one_line_without_the_request_bytes(
    error: HttpProcessingError, shown: str
) -> None:
    record = _record(error)
    assert MalformedRequestFilter().filter(record)
    text = logging.Formatter("%(levelname)s %(message)s").format(record)
    assert text == f"WARNING Error handling request from 127.0.0.1: malformed request: {shown}"


def test_other_records_pass_unchanged() -> None:
    record = _record(ValueError("a bug"))
    assert MalformedRequestFilter().filter(record)
    assert record.exc_info is not None and record.levelno == logging.ERROR

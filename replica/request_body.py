"""A request body as the client sent it: every route and the idempotency middleware read it
through `read_body`, after `encoding_middleware` has let it in.

The replica never decodes a body (server.create_app turns aiohttp's auto_decompress off), as
vLLM and uvicorn do not: a body with a Content-Encoding other than identity is a 415 naming the
encoding and saying to send it uncompressed, before any byte of it is read. Reading it through
aiohttp's decompressor made a body that was not gzip a 500 with a traceback, and a compressed
body sent whole to a SageMaker or KServe route would have reached the model as its bytes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from aiohttp import web

from replica.config import ServerConfig
from replica.errors import BadRequest, BodyTimeout, UnsupportedEncoding
from replica.keys import CONFIG

MAX_QUOTED_CHARS = 40  # of a Content-Encoding value an error quotes

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def content_encoding(request: web.Request) -> str | None:
    """The body's Content-Encoding, all its headers joined, or None for none or identity."""
    values = request.headers.getall("Content-Encoding", [])
    codings = [c.strip().lower() for value in values for c in value.split(",")]
    if all(coding in ("", "identity") for coding in codings):
        return None
    return ", ".join(v.strip() for v in values)


@web.middleware
async def encoding_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    encoding = content_encoding(request) if request.body_exists else None
    if encoding is not None:
        quoted = encoding[:MAX_QUOTED_CHARS] + ("..." if len(encoding) > MAX_QUOTED_CHARS else "")
        raise UnsupportedEncoding(
            f"Content-Encoding {quoted!r} is not supported: send the body uncompressed "
            "(no Content-Encoding, or identity)"
        )
    return await handler(request)


async def read_body(request: web.Request) -> bytes:
    """The whole body; aiohttp raises 413 past `server.max_body_bytes` (mapped by middleware).
    Framing that breaks mid-body is the client's (a 400); the parser's words quote its bytes.
    Within `server.client_body_s` (a 408): a slow client holds no handler for ever, nor does a
    chunked body whose framing breaks once it is being read (aiohttp's C parser then drops the
    body without telling the reader)."""
    config = request.app.get(CONFIG)  # an app built without one (the idempotency
    server = config.server if config is not None else ServerConfig()  # middleware alone)
    timeout_s = server.client_body_s
    try:
        async with asyncio.timeout(timeout_s):
            return await request.read()
    except TimeoutError:
        raise BodyTimeout(
            f"request body not received within server.client_body_s = {timeout_s:g} s"
        ) from None
    except web.RequestPayloadError:
        raise BadRequest(
            "the request body's framing is broken (chunked encoding or length): send the body "
            "again, whole"
        ) from None

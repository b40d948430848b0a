"""The client's request body, read whole (bounded by limits.max_body_bytes and
timeouts.client_body_s) so it has an exact length and can be sent again on a retry."""

from __future__ import annotations

import asyncio

from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError

from gateway.errors import BodyTooLarge, ClientTimeout, InvalidRequest


def _too_large(limit: int) -> BodyTooLarge:
    return BodyTooLarge(f"request body over limits.max_body_bytes = {limit} bytes")


async def read_body(request: web.Request, limit: int, timeout_s: float) -> bytes:
    if not request.can_read_body:
        return b""
    length = request.content_length
    if length is not None and length > limit:
        raise _too_large(limit)
    if length is not None and request.content.total_bytes >= length:
        # Already here with the headers: taken as it is, no timer and no read loop.
        return request.content.read_nowait(-1)
    try:
        async with asyncio.timeout(timeout_s):
            if length is not None:
                return await request.read()
            body = bytearray()
            async for chunk in request.content.iter_any():
                body += chunk
                if len(body) > limit:
                    raise _too_large(limit)
            return bytes(body)
    except TimeoutError:
        raise ClientTimeout(
            f"request body not received within timeouts.client_body_s = {timeout_s} s"
        ) from None
    except RequestPayloadError:  # its words may quote the client's bytes: not repeated
        raise InvalidRequest(
            "the request body's framing is broken (chunked encoding or length): "
            "send it again, whole"
        ) from None

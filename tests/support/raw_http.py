"""A raw HTTP/1.1 client over one socket, for what aiohttp's client will not send or does not
show: arbitrary header bytes, and interim responses (`100 Continue`) apart from the final one;
and the requests aiohttp's HTTP parser refuses, each carrying a secret a log must not show."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

from yarl import URL


@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]  # lower-case names
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


async def read_response(reader: asyncio.StreamReader, timeout_s: float = 10) -> RawResponse:
    """One response (interim or final) with a Content-Length body (the gateway's answers)."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout_s)
    status, headers = parse_head(head)
    length = int(headers.get("content-length", "0"))
    body = await asyncio.wait_for(reader.readexactly(length), timeout_s) if length else b""
    return RawResponse(status, headers, body)


def parse_head(head: bytes) -> tuple[int, dict[str, str]]:
    """A response head's status and headers (lower-case names)."""
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines if x)}
    return int(status_line.split(" ")[1]), headers


async def connect(url: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    parsed = URL(url)
    assert parsed.host is not None and parsed.port is not None
    return await asyncio.open_connection(parsed.host, parsed.port)


async def exchange(url: str, head: bytes, body: bytes = b"") -> RawResponse:
    """Send `head` (request line and headers, without the blank line) and `body` on a new
    connection; the final response."""
    reader, writer = await connect(url)
    try:
        writer.write(head + b"\r\n\r\n" + body)
        await writer.drain()
        response = await read_response(reader)
        while 100 <= response.status < 200:
            response = await read_response(reader)
        return response
    finally:
        writer.close()


async def read_until_close(port: int, raw: str) -> bytes:
    """Send `raw` as it is on a new connection; all the server answers until it closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw.encode("latin-1"))
    await writer.drain()
    try:
        return await asyncio.wait_for(reader.read(), 10)  # the server closes after a 400
    finally:
        writer.close()


def malformed_requests(api_key: str, path: str = "/v1/models", token: str = "") -> dict[str, str]:
    """Requests aiohttp's parser answers 400, by case. Two of them carry `token` (default the
    API key) to `path`: the gateway's admin token to its admin paths."""
    token = token or api_key
    return {
        "bare LF": f"GET /v1/models HTTP/1.1\nHost: x\nAuthorization: Bearer {api_key}\n\n",
        "control byte in the key's line": (
            f"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {api_key}\x01\r\n\r\n"
        ),
        "NUL in a later header": (
            f"GET {path} HTTP/1.1\r\nAuthorization: Bearer {token}\r\nX-Trace: a\x00b\r\n\r\n"
        ),
        "control byte in the path": (
            f"GET {path}\x7f HTTP/1.1\r\nAuthorization: Bearer {token}\r\n\r\n"
        ),
        "bad method": f"G\x01T /v1/models HTTP/1.1\r\nAuthorization: Bearer {api_key}\r\n\r\n",
        "bad chunk framing": (
            "POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
            f"Authorization: Bearer {api_key}\r\n\r\nzz{api_key}\r\n"
        ),
    }


def assert_json_refusal(answer: bytes, status: int, *secrets: str) -> dict[str, str]:
    """`answer` (raw, as read off the socket) is `status` with our JSON error body, which quotes
    none of `secrets`; returns its `error` object."""
    head, _, body = answer.partition(b"\r\n\r\n")
    got, headers = parse_head(head)
    assert got == status, answer[:300]
    assert headers["content-type"].startswith("application/json"), answer[:300]
    error: dict[str, str] = json.loads(body)["error"]
    assert error["type"] == ("invalid_request" if status < 500 else "internal_error"), error
    assert error["message"], error
    for secret in secrets:
        assert secret not in body.decode("latin-1"), body
    return error

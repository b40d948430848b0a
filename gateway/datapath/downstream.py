"""The downstream side of a proxied exchange: the client's request as the proxy reads it and the
three ways the relay answers it (a whole reply; a response started, written, ended; a cut).
Two front ends carry it: aiohttp's server (`AiohttpDownstream`, every path the gateway owns
and anything unusual) and the lean HTTP/1.1 front of gateway/app/front.py (plain proxied
requests), so the proxy and relay run the same on both.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Protocol

from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.config import ApiKey
from gateway.datapath.auth import api_key, key_name
from gateway.datapath.body import read_body


@dataclass(frozen=True, slots=True)
class Buffered:
    """A whole response held by the gateway: a replica's answer read in full (a small body, or
    a 429/503 kept for the client in case no retry does better)."""

    status: int
    reason: str | None
    headers: CIMultiDict[str]
    body: bytes


class Downstream(Protocol):
    """One client request and its answer. `key`/`key_name`: the API key it authenticated with
    (None/'' when auth is off). Writing to a client that has gone raises ConnectionResetError."""

    method: str
    path_qs: str  # the path and query as sent (never decoded)
    headers: CIMultiDictProxy[str]
    scheme: str
    host: str | None  # the Host header
    key: ApiKey | None
    key_name: str

    @property
    def path(self) -> str:
        """The path, percent-decoded (for names and spans, never for routing)."""
        ...

    @property
    def remote(self) -> str | None:
        """The client's address."""
        ...

    async def body(self, limit: int, timeout_s: float) -> bytes:
        """The body, whole: BodyTooLarge past `limit`, ClientTimeout past `timeout_s`."""
        ...

    async def reply(self, answer: Buffered) -> None:
        """Answer with a whole response."""

    async def start(self, status: int, reason: str | None, headers: CIMultiDict[str]) -> bool:
        """Send the status and headers of a response whose body follows (its length as
        `headers` give it, else chunked); True when it is chunked."""
        ...

    async def write(self, chunk: bytes) -> None:
        """A piece of the started response's body, sent once the client has room for it."""

    async def end(self) -> None:
        """The started response is complete."""

    def piped(self) -> asyncio.Transport | None:
        """The client's transport, for chunks written straight to it while it keeps up (the
        relay frames them); None when this front end does not allow it."""
        ...

    def abort(self) -> None:
        """Close the connection at once (a response that cannot complete)."""


class AiohttpDownstream:
    """A request aiohttp's server took: the answer is `response` once the proxy returns (a whole
    reply is sent by aiohttp then; a started one is already under way)."""

    def __init__(self, request: web.Request) -> None:
        self.request = request
        self.method = request.method
        self.path_qs = request.rel_url.raw_path_qs
        self.headers = request.headers
        self.remote = request.remote
        self.scheme = request.scheme
        self.host: str | None = request.host
        self.key = api_key(request)
        self.key_name = key_name(request)
        self.response: web.StreamResponse | None = None

    @property
    def path(self) -> str:
        return self.request.path

    async def body(self, limit: int, timeout_s: float) -> bytes:
        return await read_body(self.request, limit, timeout_s)

    async def reply(self, answer: Buffered) -> None:
        self.response = web.Response(
            status=answer.status, reason=answer.reason, body=answer.body, headers=answer.headers
        )

    async def start(self, status: int, reason: str | None, headers: CIMultiDict[str]) -> bool:
        response = self.response = web.StreamResponse(status=status, reason=reason)
        response.headers.extend(headers)
        await response.prepare(self.request)
        return response.headers.get("Transfer-Encoding") == "chunked"

    async def write(self, chunk: bytes) -> None:
        assert self.response is not None
        await self.response.write(chunk)

    async def end(self) -> None:
        assert self.response is not None
        await self.response.write_eof()

    def piped(self) -> asyncio.Transport | None:
        return self.request.transport

    def abort(self) -> None:
        if self.request.transport is not None:
            self.request.transport.abort()

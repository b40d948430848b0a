"""A double of the upstream client (transport.Upstream) that answers from a function, so the
proxy's retry, relay and cut logic run on loopback without a replica (as httpx ships
MockTransport beside its transports).

    upstream = MockUpstream(lambda request: MockResponse(200, body=[b"data: 1\\n\\n"]))
    app = create_app(config, upstream=upstream)

The handler gets each UpstreamRequest and returns a MockResponse, or raises UpstreamFailure (no
response head: connect_error, reset, timeout). A body is a list of chunks; an UpstreamFailure in
it is raised when the relay reaches it (the replica failed mid-body). `requests` holds what was
sent, and each response says whether it was released or closed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

from multidict import CIMultiDict

from gateway.datapath.transport import (
    UpstreamFailure,
    UpstreamRequest,
    UpstreamResponse,
    UpstreamTimeouts,
)


class MockResponse:
    def __init__(
        self,
        status: int = 200,
        headers: Sequence[tuple[str, str]] = (),
        body: bytes | Sequence[bytes | UpstreamFailure] = b"",
        *,
        reason: str = "",
        chunk_delay_s: float = 0.0,
    ) -> None:
        self.status = status
        self.reason = reason
        self._headers = list(headers)
        self._body = [body] if isinstance(body, bytes) else list(body)
        sized = isinstance(body, bytes) and not any(
            n.lower() == "transfer-encoding" for n, _ in headers
        )
        self.content_length: int | None = len(body) if sized else None
        if sized:
            self._headers.append(("Content-Length", str(len(body))))
        self._delay_s = chunk_delay_s
        self.released = False
        self.closed = False

    def header(self, lower_name: bytes) -> str | None:
        name = lower_name.decode("latin-1")
        return next((v for n, v in self._headers if n.lower() == name), None)

    def headers(self, dropped: frozenset[str] = frozenset()) -> CIMultiDict[str]:
        named = {
            token.strip().lower()
            for name, value in self._headers
            if name.lower() == "connection"
            for token in value.split(",")
        }
        return CIMultiDict((n, v) for n, v in self._headers if n.lower() not in dropped | named)

    async def chunk(self) -> bytes:
        while self._body:
            if self._delay_s:
                await asyncio.sleep(self._delay_s)
            part = self._body.pop(0)
            if isinstance(part, UpstreamFailure):
                raise part
            if part:
                return part
        return b""

    async def read(self, limit: int) -> bytes | None:
        parts = []
        while data := await self.chunk():
            parts.append(data)
            if sum(map(len, parts)) > limit:
                return None
        return b"".join(parts)

    def pipe(self, sink: Callable[[bytes], bool] | None) -> None:
        """Bytes come only through chunk() here: the relay's task path is what is tested."""

    def release(self) -> None:
        self.released = True

    def close(self) -> None:
        self.closed = True


Handler = Callable[[UpstreamRequest], MockResponse]


class MockUpstream:
    def __init__(self, handler: Handler) -> None:
        self._handler = handler
        self.requests: list[UpstreamRequest] = []
        self.responses: list[MockResponse] = []

    async def send(self, request: UpstreamRequest, timeouts: UpstreamTimeouts) -> UpstreamResponse:
        self.requests.append(request)
        response = self._handler(request)  # may raise UpstreamFailure: no response head
        self.responses.append(response)
        return response

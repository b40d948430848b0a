"""A replica that speaks HTTP/1.1 byte by byte, well or badly: a raw TCP server on loopback
whose answers each test scripts, for the gateway's upstream client to meet at the true edge."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

# (request head, its number on this connection, writer) -> keep the connection open?
Answer = Callable[[bytes, int, asyncio.StreamWriter], Awaitable[bool]]


@dataclass
class RawUpstream:
    url: str
    requests: list[bytes] = field(default_factory=list)
    by_connection: list[int] = field(default_factory=list)  # the connection of each request
    # Connections the gateway closed between requests (EOF where a request would start).
    closed_by_peer: set[int] = field(default_factory=set)
    _next: int = 0

    def connections(self, marker: bytes) -> set[int]:
        """Connections that carried requests whose head holds `marker` (the test's own, not
        the gateway's pollers')."""
        return {c for c, h in zip(self.by_connection, self.requests, strict=True) if marker in h}


@asynccontextmanager
async def raw_upstream(answer: Answer) -> AsyncIterator[RawUpstream]:
    upstream = RawUpstream("")

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream._next += 1
        connection = upstream._next
        try:
            for number in range(1000):
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError as exc:
                    if not exc.partial:
                        upstream.closed_by_peer.add(connection)
                    raise
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                await reader.readexactly(length)
                upstream.requests.append(head)
                upstream.by_connection.append(connection)
                if not await answer(head, number, writer):
                    break
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    upstream.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        yield upstream
    finally:
        server.close()
        await server.wait_closed()


def config_for(url: str, **extra: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "routing": {"strategy": "least_outstanding_requests"},
        "replicas": [{"url": url}],
        "reload": {"poll_interval_s": 0.1},
        "outlier_detection": None,  # one replica, failing on purpose: never ejected
    }
    config.update(extra)
    return config


def fixed(body: bytes, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), extra, body)

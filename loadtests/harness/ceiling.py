"""The Python ceiling of the front-end benchmark: a bare relay on uvloop + httptools, as little
as a Python front end can do per request. N processes each listen on the same port
(`SO_REUSEPORT`); a client connection's requests go, one at a time, to the replicas in turn over
a keep-alive pool, and the replica's response bytes go back as they arrive (its own framing,
Content-Length or chunked, untouched). No routing state, no limits, no metrics, no checks: it
is the bound the gateway is measured against, never a front end to run.

    python -m loadtests.harness.ceiling --port 8080 --workers 2 http://127.0.0.1:9001 ...
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import signal
import socket
from collections.abc import Iterator

import httptools
import uvloop

_HOP = frozenset({b"host", b"connection", b"keep-alive", b"content-length", b"transfer-encoding"})


class _Pool:
    """Idle upstream connections by replica, and the replicas in turn."""

    def __init__(self, replicas: list[tuple[str, int]]) -> None:
        self.turn: Iterator[tuple[str, int]] = itertools.cycle(replicas)
        self.idle: dict[tuple[str, int], list[_Upstream]] = {r: [] for r in replicas}

    async def take(self) -> _Upstream:
        replica = next(self.turn)
        idle = self.idle[replica]
        while idle:
            conn = idle.pop()
            if not conn.closed:
                return conn
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(lambda: _Upstream(self, replica), *replica)
        return conn


class _Upstream(asyncio.Protocol):
    def __init__(self, pool: _Pool, replica: tuple[str, int]) -> None:
        self.pool, self.replica = pool, replica
        self.transport: asyncio.Transport | None = None
        self.client: _Client | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.set_write_buffer_limits(0)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        if self.client is not None:
            self.client.send(data)  # the response's bytes as they are
        self.parser.feed_data(data)

    def on_message_complete(self) -> None:
        client, self.client = self.client, None
        if self.parser.should_keep_alive():
            self.pool.idle[self.replica].append(self)
        else:
            self.closed = True
            assert self.transport is not None
            self.transport.close()
        if client is not None:
            client.done()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.client is not None:
            self.client.abort()


class _Client(asyncio.Protocol):
    """One client connection: a request parsed, relayed, its response piped back; then the
    next (pipelined requests wait in the parser's buffer while reading is paused)."""

    def __init__(self, pool: _Pool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.headers: list[bytes] = []
        self.body: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self.abort()
        except httptools.HttpParserError:
            self.send(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            self.abort()

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() not in _HOP:
            self.headers.append(b"%s: %s\r\n" % (name, value))

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        assert self.transport is not None
        self.transport.pause_reading()  # one request at a time on this connection
        body = b"".join(self.body)
        head = b"%s %s HTTP/1.1\r\nHost: upstream\r\nContent-Length: %d\r\n%s\r\n" % (
            self.parser.get_method(), self.url, len(body), b"".join(self.headers),
        )  # fmt: skip
        self.url, self.headers, self.body = b"", [], []
        asyncio.get_running_loop().create_task(self._relay(head + body))

    async def _relay(self, request: bytes) -> None:
        try:
            conn = await self.pool.take()
        except OSError:
            self.send(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")
            self.done()
            return
        conn.client = self
        assert conn.transport is not None
        conn.transport.write(request)

    def send(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def done(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


def _listening(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", port))
    return sock


async def serve(port: int, replicas: list[tuple[str, int]]) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    pool = _Pool(replicas)
    server = await loop.create_server(lambda: _Client(pool), sock=_listening(port), backlog=4096)
    async with server:
        await stop.wait()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m loadtests.harness.ceiling")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("replicas", nargs="+", help="http://HOST:PORT")
    args = parser.parse_args()
    replicas = []
    for url in args.replicas:
        host, _, port = url.removeprefix("http://").rstrip("/").rpartition(":")
        replicas.append((host, int(port)))
    children = []
    for _ in range(args.workers - 1):
        pid = os.fork()
        if pid == 0:
            uvloop.run(serve(args.port, replicas))
            os._exit(0)
        children.append(pid)
    try:
        uvloop.run(serve(args.port, replicas))
    finally:
        for pid in children:
            os.kill(pid, signal.SIGTERM)
        for pid in children:
            os.waitpid(pid, 0)


if __name__ == "__main__":
    main()

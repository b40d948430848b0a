"""The proxy's own upstream HTTP/1.1 client (gateway/h1client.py) against replicas that speak
HTTP/1.1 byte by byte, well or badly: a raw TCP server on loopback scripts each answer, and a
real gateway sits in front. Tests assert on what the client sees, and counts end at zero."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.support.servers import running_gateway, write_config

# (request head, its number on this connection, writer) -> keep the connection open?
Answer = Callable[[bytes, int, asyncio.StreamWriter], Awaitable[bool]]


@dataclass
class RawUpstream:
    url: str
    requests: list[bytes] = field(default_factory=list)
    by_connection: list[int] = field(default_factory=list)  # the connection of each request
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
                head = await reader.readuntil(b"\r\n\r\n")
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


async def test_keep_alive_connection_is_reused_and_a_closed_one_replaced(tmp_path: Path) -> None:
    async def answer(head: bytes, number: int, writer: asyncio.StreamWriter) -> bool:
        writer.write(fixed(b"ok %d" % number))
        return b"/last" not in head  # the replica closes after /last, as at its keep-alive end

    async with raw_upstream(answer) as upstream:
        path = tmp_path / "g.yaml"
        write_config(path, config_for(upstream.url))
        async with running_gateway(path) as gw, aiohttp.ClientSession() as client:
            for i in range(5):
                async with client.post(f"{gw.url}/v1/x", data=b"{}") as response:
                    assert response.status == 200
                    assert await response.read() == b"ok %d" % i
            assert len(upstream.connections(b"/v1/x")) == 1
            async with client.get(f"{gw.url}/last") as response:
                assert await response.read() == b"ok 5"
            await asyncio.sleep(0.2)  # the replica's FIN reaches the gateway's idle connection
            async with client.get(f"{gw.url}/after") as response:
                assert response.status == 200
                assert await response.read() == b"ok 0"
            assert upstream.connections(b"/last") == upstream.connections(b"/v1/x")
            assert len(upstream.connections(b"/after")) == 1
            assert upstream.connections(b"/after") != upstream.connections(b"/last")
    head = next(h for h in upstream.requests if b"/v1/x" in h).decode()
    assert head.startswith("POST /v1/x HTTP/1.1\r\n")
    assert f"Host: {upstream.url.removeprefix('http://')}\r\n" in head
    assert "Content-Length: 2\r\n" in head
    last = next(h for h in upstream.requests if b"/last" in h).decode()
    assert "Content-Length" not in last  # a GET with no body


async def test_chunked_until_close_head_and_interim_answers_are_relayed_whole(
    tmp_path: Path,
) -> None:
    async def answer(head: bytes, number: int, writer: asyncio.StreamWriter) -> bool:
        if b"/chunked" in head:
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            for part in (b"hello ", b"chunked ", b"world"):
                writer.write(b"%x\r\n%s\r\n" % (len(part), part))
                await writer.drain()
                await asyncio.sleep(0.01)
            writer.write(b"0\r\n\r\n")
            return True
        if b"/until-close" in head:
            writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nall of it, then EOF")
            return False
        if head.startswith(b"HEAD"):
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Kind: head\r\n\r\n")
            return True
        writer.write(b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n")
        writer.write(fixed(b"final", b"Connection: X-Secret\r\nX-Secret: 1\r\nX-Kept: 2\r\n"))
        return True

    async with raw_upstream(answer) as upstream:
        path = tmp_path / "g.yaml"
        write_config(path, config_for(upstream.url))
        async with running_gateway(path) as gw, aiohttp.ClientSession() as client:
            async with client.get(f"{gw.url}/chunked") as response:
                assert await response.read() == b"hello chunked world"
            async with client.get(f"{gw.url}/until-close") as response:
                assert await response.read() == b"all of it, then EOF"
            async with client.head(f"{gw.url}/x") as response:
                assert response.status == 200
                assert response.headers["X-Kind"] == "head"
            async with client.get(f"{gw.url}/hints") as response:
                assert response.status == 200
                assert await response.read() == b"final"
                assert "X-Secret" not in response.headers  # named by the replica's Connection
                assert response.headers["X-Kept"] == "2"


async def test_broken_answers_are_clean_json_errors(tmp_path: Path) -> None:
    async def answer(head: bytes, number: int, writer: asyncio.StreamWriter) -> bool:
        if b"/garbage" in head:
            writer.write(b"HTTP/1.1 abc nonsense\r\n\r\n")
            return False
        if b"/short" in head:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly ten b")
            return False
        if b"/silent" in head:
            await asyncio.sleep(2)
            return False
        writer.close()  # closes before answering
        return False

    async with raw_upstream(answer) as upstream:
        path = tmp_path / "g.yaml"
        config = config_for(upstream.url, timeouts={"first_byte_s": 0.3})
        config["retries"] = {"max_attempts": 1}
        write_config(path, config)
        async with running_gateway(path) as gw, aiohttp.ClientSession() as client:
            expected = {
                "/garbage": (502, "malformed response"),
                "/short": (502, "closed the connection: mid-body"),
                "/silent": (504, "no response headers within 0.3 s"),
                "/hangup": (502, "closed the connection: connection closed before"),
            }
            for target, (status, words) in expected.items():
                async with client.get(f"{gw.url}{target}") as response:
                    assert response.status == status, target
                    error = (await response.json())["error"]
                    assert words in error["message"], (target, error)


async def test_a_stream_that_goes_silent_is_cut_and_a_slow_reader_gets_every_byte(
    tmp_path: Path,
) -> None:
    block = bytes(range(256)) * 256  # 64 KiB
    blocks = 64  # 4 MiB, far past the client's high-water mark

    async def answer(head: bytes, number: int, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n")
        writer.write(b"Transfer-Encoding: chunked\r\n\r\n")
        if b"/stall" in head:
            writer.write(b"b\r\ndata: one\n\n\r\n")
            await writer.drain()
            await asyncio.sleep(2)
            return False
        for _ in range(blocks):
            writer.write(b"%x\r\n%s\r\n" % (len(block), block))
            await writer.drain()
        writer.write(b"0\r\n\r\n")
        return True

    async with raw_upstream(answer) as upstream:
        path = tmp_path / "g.yaml"
        write_config(path, config_for(upstream.url, timeouts={"idle_s": 0.3}))
        async with running_gateway(path) as gw, aiohttp.ClientSession() as client:
            async with client.get(f"{gw.url}/stall") as response:
                assert await response.content.readline() == b"data: one\n"
                body = b""
                with pytest.raises(aiohttp.ClientPayloadError):  # an error event, then the cut
                    while chunk := await response.content.readany():
                        body += chunk
                assert b"event: error" in body
                assert b"no body bytes within 0.3 s" in body
            received = bytearray()
            async with client.get(f"{gw.url}/bulk") as response:
                async for chunk in response.content.iter_chunked(256 * 1024):
                    received += chunk
                    await asyncio.sleep(0.005)
            assert received == block * blocks

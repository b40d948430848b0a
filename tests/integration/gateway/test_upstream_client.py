"""The proxy's own upstream HTTP/1.1 client (gateway/datapath/h1client.py) against replicas
that speak HTTP/1.1 byte by byte, well or badly: a raw TCP server on loopback scripts each
answer, and a real gateway sits in front. Tests assert on what the client sees, and counts end
at zero."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import pytest

from tests.support.raw_upstream import config_for, fixed, raw_upstream
from tests.support.servers import running_gateway, write_config


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

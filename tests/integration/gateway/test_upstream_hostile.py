"""The upstream client against replicas that misbehave at the HTTP/1.1 level (issue 30, B): a
stale keep-alive connection, a second response smuggled after the first, endless headers,
trailers and impossible status codes. Raw TCP replicas on loopback, a real gateway in front;
every test asserts what the client sees, and counts end at zero."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from gateway.datapath.proxy import UPSTREAM
from tests.support.raw_upstream import config_for, fixed, raw_upstream
from tests.support.servers import running_gateway, wait_until, write_config


async def test_a_response_followed_by_the_start_of_another_closes_its_connection(
    tmp_path: Path,
) -> None:
    # The replica's answer to /first carries, in the same write, the head and part of the body
    # of a second response nobody asked for: the next client must get its own answer.
    smuggled = b"HTTP/1.1 200 OK\r\nX-Smuggled: yes\r\nContent-Length: 40\r\n\r\nSMUGGLED"

    async def answer(head: bytes, number: int, writer: asyncio.StreamWriter) -> bool:
        writer.write(fixed(b"first") + smuggled if b"/first" in head else fixed(b"mine"))
        return True

    async with raw_upstream(answer) as upstream:
        write_config(tmp_path / "g.yaml", config_for(upstream.url))
        async with running_gateway(tmp_path / "g.yaml") as gw:
            async with aiohttp.ClientSession() as one, one.get(f"{gw.url}/first") as response:
                first = (response.status, await response.read(), dict(response.headers))
            async with aiohttp.ClientSession() as two, two.get(f"{gw.url}/second") as response:
                second = (response.status, await response.read(), dict(response.headers))
    assert first[:2] == (200, b"first") and "X-Smuggled" not in first[2]
    assert second[:2] == (200, b"mine") and "X-Smuggled" not in second[2]
    assert upstream.connections(b"/second").isdisjoint(upstream.connections(b"/first"))


@pytest.mark.parametrize("shape", ["many", "long"])
async def test_response_headers_past_the_cap_are_a_502_and_never_held_whole(
    tmp_path: Path, shape: str
) -> None:
    # 16 MiB of headers: many 8 KiB lines, or one endless value.
    total = 16 * 1024 * 1024
    sent = 0

    async def answer(head: bytes, number: int, writer: asyncio.StreamWriter) -> bool:
        nonlocal sent
        if b"/headers" not in head:  # the gateway's pollers
            writer.write(fixed(b"{}"))
            return True
        writer.write(b"HTTP/1.1 200 OK\r\n" + (b"X-Long: " if shape == "long" else b""))
        line = b"X-Pad: %s\r\n" % (b"a" * (8 * 1024 - 9))  # 8 KiB: bytes, not count
        piece = b"a" * 64 * 1024 if shape == "long" else line * 8
        try:
            while sent < total:
                writer.write(piece)
                await writer.drain()
                sent += len(piece)
            writer.write(b"\r\nContent-Length: 0\r\n\r\n")
            await writer.drain()
        except ConnectionError:
            pass
        return False

    async with raw_upstream(answer) as upstream:
        write_config(tmp_path / "g.yaml", config_for(upstream.url, retries={"max_attempts": 1}))
        async with running_gateway(tmp_path / "g.yaml") as gw, aiohttp.ClientSession() as client:
            async with client.get(f"{gw.url}/headers") as response:
                status, error = response.status, (await response.json())["error"]
    assert status == 502
    assert "response headers over 65536 bytes" in error["message"]
    assert sent < total // 2  # the gateway hung up early: the socket buffers hold the rest


async def test_more_than_100_response_headers_are_a_502(tmp_path: Path) -> None:
    async def answer(head: bytes, number: int, writer: asyncio.StreamWriter) -> bool:
        count = 101 if b"/over" in head else 100
        writer.write(fixed(b"ok", b"".join(b"X-H%d: v\r\n" % i for i in range(count - 1))))
        return True

    async with raw_upstream(answer) as upstream:
        write_config(tmp_path / "g.yaml", config_for(upstream.url, retries={"max_attempts": 1}))
        async with running_gateway(tmp_path / "g.yaml") as gw, aiohttp.ClientSession() as client:
            async with client.get(f"{gw.url}/at") as response:
                assert (response.status, await response.read()) == (200, b"ok")
            async with client.get(f"{gw.url}/over") as response:
                assert response.status == 502
                assert "over 100 headers" in (await response.json())["error"]["message"]


async def test_trailers_stay_out_of_the_headers_and_bad_status_codes_are_502(
    tmp_path: Path,
) -> None:
    async def answer(head: bytes, number: int, writer: asyncio.StreamWriter) -> bool:
        if b"/trailers" in head:
            writer.write(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Checksum\r\n\r\n"
                b"5\r\nhello\r\n0\r\nX-Checksum: abc\r\nX-Other: def\r\n\r\n"
            )
            return True
        if b"/status/" in head:
            code = head.split(b"/status/", 1)[1][:3]
            writer.write(b"HTTP/1.1 %s Odd\r\nContent-Length: 2\r\n\r\nok" % code)
            return True
        writer.write(fixed(b"plain"))
        return True

    async with raw_upstream(answer) as upstream:
        write_config(tmp_path / "g.yaml", config_for(upstream.url, retries={"max_attempts": 1}))
        async with running_gateway(tmp_path / "g.yaml") as gw, aiohttp.ClientSession() as client:
            for target in ("/trailers", "/plain"):  # the next answer on that connection too
                async with client.get(f"{gw.url}{target}") as response:
                    assert response.status == 200
                    assert await response.read() in (b"hello", b"plain")
                    assert "X-Checksum" not in response.headers, target
                    assert "X-Other" not in response.headers, target
            for code in ("600", "000", "099"):
                async with client.get(f"{gw.url}/status/{code}") as response:
                    assert response.status == 502, code
                    error = (await response.json())["error"]
                    assert f"invalid status code {code}" in error["message"], error
            async with client.get(f"{gw.url}/status/599") as response:
                assert response.status == 599


async def test_a_reused_connection_the_replica_has_closed_is_retried_on_a_new_one(
    tmp_path: Path,
) -> None:
    # The replica answers one request per connection, then closes the next one's connection
    # without a byte, as a replica does whose idle timeout ends just as the request arrives.
    async def answer(head: bytes, number: int, writer: asyncio.StreamWriter) -> bool:
        if number > 0:
            return False
        writer.write(fixed(b"ok"))
        return True

    async with raw_upstream(answer) as upstream:
        config = config_for(upstream.url, retries={"max_attempts": 1})
        config["outlier_detection"] = {"consecutive_failures": 1}
        write_config(tmp_path / "g.yaml", config)
        async with running_gateway(tmp_path / "g.yaml") as gw, aiohttp.ClientSession() as client:
            statuses = []
            for _ in range(10):
                async with client.post(f"{gw.url}/v1/x", data=b"{}") as response:
                    statuses.append(response.status)
                    await response.read()
            (replica,) = gw.state.pool.all()
            failures, ejected = replica.consecutive_failures, gw.state.pool.is_ejected(replica)
            retried = gw.app[UPSTREAM].stale_retries
    assert statuses == [200] * 10
    assert (failures, ejected, retried) == (0, False, 9)
    # Requests 2 to 10 each went out twice: on the reused connection, then on a new one.
    assert sum(b"/v1/x" in h for h in upstream.requests) == 19
    assert len(upstream.connections(b"/v1/x")) == 10


async def test_a_replica_closing_idle_connections_after_half_a_second_costs_no_request(
    tmp_path: Path,
) -> None:
    # Acceptance (issue 30, B.3): 500 requests, paced around the replica's 0.5 s idle close.
    async def ok(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", ok)
    runner = web.AppRunner(app, keepalive_timeout=0.5, access_log=None, shutdown_timeout=1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    rng = random.Random(30)
    statuses: list[int] = []

    async def user(client: aiohttp.ClientSession, url: str) -> None:
        for _ in range(10):
            async with client.post(f"{url}/v1/completions", json={"prompt": "x"}) as response:
                statuses.append(response.status)
                await response.read()
            await asyncio.sleep(rng.uniform(0.46, 0.54))

    try:
        config = config_for(f"http://127.0.0.1:{port}", retries={"max_attempts": 1})
        write_config(tmp_path / "g.yaml", config)
        async with running_gateway(tmp_path / "g.yaml") as gw, aiohttp.ClientSession() as client:
            await asyncio.gather(*(user(client, gw.url) for _ in range(50)))
    finally:
        await runner.cleanup()
    assert len(statuses) == 500
    assert statuses.count(200) == 500, {s: statuses.count(s) for s in set(statuses)}


async def test_idle_connections_close_after_upstream_keepalive_s(tmp_path: Path) -> None:
    async def answer(head: bytes, number: int, writer: asyncio.StreamWriter) -> bool:
        writer.write(fixed(b"ok"))
        return True

    async with raw_upstream(answer) as upstream:
        config = config_for(upstream.url, timeouts={"upstream_keepalive_s": 0.2})
        write_config(tmp_path / "g.yaml", config)
        async with running_gateway(tmp_path / "g.yaml") as gw, aiohttp.ClientSession() as client:
            async with client.get(f"{gw.url}/one") as response:
                assert response.status == 200
            # The gateway closes it, unasked, before the replica's own idle timeout would.
            await wait_until(lambda: upstream.connections(b"/one") <= upstream.closed_by_peer)
            async with client.get(f"{gw.url}/two") as response:
                assert response.status == 200
    assert upstream.connections(b"/two").isdisjoint(upstream.connections(b"/one"))

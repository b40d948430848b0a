"""The probes' default fetch against a loopback replica: a 200's body read up to its cap, no
other body read, the status alone when asked for it, the query sent."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from gateway.control.fetch import BodyOverLimit, Fetch, session_fetch
from gateway.control.probe import PROBE_FAILURES
from tests.support.servers import serve


async def endless(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(status=int(request.query.get("status", "200")))
    await response.prepare(request)
    while True:
        await response.write(b"x" * 65536)
        await asyncio.sleep(0)


async def echo(request: web.Request) -> web.Response:
    return web.Response(body=request.query_string.encode())


@pytest.fixture
async def replica() -> AsyncIterator[tuple[str, Fetch]]:
    app = web.Application()
    app.router.add_get("/endless", endless)
    app.router.add_get("/echo", echo)
    async with serve(app) as url, aiohttp.ClientSession() as session:
        yield url, session_fetch(lambda: session)


async def test_a_200_is_read_and_the_query_sent(replica: tuple[str, Fetch]) -> None:
    url, fetch = replica
    assert await fetch(f"{url}/echo", {"model": "org/m"}, 1024) == (200, b"model=org/m")
    assert await fetch(f"{url}/nowhere", None, 1024) == (404, b"")


async def test_an_endless_body_is_cut_at_the_cap_or_never_read(replica: tuple[str, Fetch]) -> None:
    url, fetch = replica
    with pytest.raises(BodyOverLimit):
        await fetch(f"{url}/endless", None, 100_000)
    assert issubclass(BodyOverLimit, PROBE_FAILURES)
    async with asyncio.timeout(5):
        assert await fetch(f"{url}/endless", None, 0) == (200, b"")  # the status alone
        assert await fetch(f"{url}/endless", {"status": "500"}, 100_000) == (500, b"")

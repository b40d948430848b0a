"""What counts against a replica (issue 30, A.1): a 5xx the request itself caused must not eject
it, or any client could take replicas out of rotation. Real replica processes and a stand-in
that answers 500, behind a real gateway on loopback."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from tests.support.processes import start_replica, wait_replica_ready
from tests.support.servers import running_gateway, serve, write_config

DEEP = 5000


def _deep_bodies() -> list[bytes]:
    """JSON nested DEEP levels: as the whole body, and inside the fields a replica reads."""
    arrays = b"[" * DEEP + b"]" * DEEP
    objects = b'{"a":' * DEEP + b"1" + b"}" * DEEP
    return [
        arrays,
        objects,
        b'{"model": "tiny-gpt", "prompt": ' + arrays + b', "max_tokens": 2}',
        b'{"model": "tiny-gpt", "messages": ' + arrays + b"}",
        b'{"model": "tiny-gpt", "prompt": "hi", "stop": ' + objects + b"}",
    ]


@contextlib.asynccontextmanager
async def _replica_processes(n: int) -> AsyncIterator[list[str]]:
    started = [await start_replica("--engine", "simulated") for _ in range(n)]
    try:
        async with aiohttp.ClientSession() as session:
            for _, url in started:
                await wait_replica_ready(session, url)
        yield [url for _, url in started]
    finally:
        for process, _ in started:
            process.terminate()
        for process, _ in started:
            await asyncio.wait_for(process.wait(), 10)


async def test_deeply_nested_bodies_leave_every_replica_in_rotation(tmp_path: Path) -> None:
    path = tmp_path / "g.yaml"
    async with _replica_processes(2) as urls:
        config: dict[str, Any] = {
            "replicas": [{"url": url} for url in urls],
            "routing": {"strategy": "round_robin"},
            "outlier_detection": {"consecutive_failures": 2, "max_ejected_percent": 100},
        }
        write_config(path, config)
        async with running_gateway(path) as gw, aiohttp.ClientSession() as client:
            statuses = []
            for body in _deep_bodies() * 2:
                for endpoint in ("/v1/completions", "/v1/chat/completions"):
                    async with client.post(
                        f"{gw.url}{endpoint}",
                        data=body,
                        headers={"Content-Type": "application/json"},
                    ) as response:
                        payload = await response.json()
                        statuses.append(response.status)
                        assert payload["error"]["message"], payload
            assert set(statuses) <= {400, 413, 422}, statuses
            pool = gw.state.pool
            assert [pool.is_ejected(r) for r in pool.all()] == [False, False]
            assert all(r.consecutive_failures == 0 for r in pool.all())
            # And the fleet still serves.
            for _ in range(4):
                request = {"model": "tiny-gpt", "prompt": "hello", "max_tokens": 2}
                async with client.post(f"{gw.url}/v1/completions", json=request) as response:
                    assert response.status == 200, await response.text()


def _answering(status: int) -> web.Application:
    async def answer(request: web.Request) -> web.Response:
        await request.read()
        error = {"error": {"type": "internal_error", "message": "cannot handle this input"}}
        return web.json_response(error, status=status)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    return app


async def _statuses_and_ejection(
    tmp_path: Path, status: int, outlier: dict[str, Any]
) -> tuple[set[int], bool]:
    path = tmp_path / "g.yaml"
    async with serve(_answering(status)) as url:
        config = {
            "replicas": [{"url": url}],
            "retries": {"max_attempts": 1},
            "outlier_detection": {"max_ejected_percent": 100, **outlier},
        }
        write_config(path, config)
        async with running_gateway(path) as gw, aiohttp.ClientSession() as client:
            seen = set()
            for _ in range(3):
                async with client.post(f"{gw.url}/v1/completions", data=b"{}") as response:
                    await response.read()
                    seen.add(response.status)
            replica = gw.state.pool.all()[0]
            return seen, gw.state.pool.is_ejected(replica)


async def test_a_replica_answering_500_is_not_ejected_by_default(tmp_path: Path) -> None:
    seen, ejected = await _statuses_and_ejection(tmp_path, 500, {"consecutive_failures": 2})
    assert seen == {500}  # the client gets the replica's answer as it is
    assert not ejected


async def test_count_5xx_makes_a_500_count_against_the_replica(tmp_path: Path) -> None:
    outlier = {"consecutive_failures": 2, "count_5xx": True}
    seen, ejected = await _statuses_and_ejection(tmp_path, 500, outlier)
    assert 500 in seen
    assert ejected


async def test_gateway_failures_from_the_replica_eject_by_default(tmp_path: Path) -> None:
    for status in (502, 504):
        seen, ejected = await _statuses_and_ejection(tmp_path, status, {"consecutive_failures": 2})
        assert status in seen
        assert ejected, status

"""Edges of the data path (a reload mid-queue, 429s and ejection, forwarded headers, huge
429 bodies, odd targets, SSE error events), each through a real gateway on loopback in front
of fake-replica servers: what a client sees, and counts back at zero."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp
from aiohttp import web

from tests.support.servers import (
    fake_replicas,
    gateway_config,
    running_gateway,
    serve,
    wait_until,
    write_config,
)


async def test_a_replica_added_by_reload_serves_the_request_queued_for_a_slot(
    tmp_path: Path,
) -> None:
    """A.1: the queued request goes to the new replica at once, not a 429 after the timeout."""
    path = tmp_path / "g.yaml"
    async with fake_replicas(2) as (first, second):
        config = gateway_config([first], "least_outstanding_requests")
        config["replicas"][0]["max_concurrency"] = 1
        config["limits"] = {"max_queue": 4, "queue_timeout_s": 30}
        write_config(path, config)
        async with running_gateway(path) as gw, aiohttp.ClientSession() as client:
            held = asyncio.create_task(client.get(f"{gw.url}/hold"))
            await wait_until(lambda: first.in_flight == 1)
            queued = asyncio.create_task(client.get(f"{gw.url}/echo"))
            await wait_until(lambda: gw.state.admission.queued == 1)
            config["replicas"].append({"url": second.url, "max_concurrency": 1})
            write_config(path, config)
            started = time.monotonic()
            response = await asyncio.wait_for(queued, 10)
            assert response.status == 200, await response.text()
            assert response.headers["X-Infergate-Replica"] == second.url
            assert time.monotonic() - started < 10  # well before queue_timeout_s
            response.release()
            first.release.set()
            (await held).release()


async def test_instant_429s_do_not_hide_a_failing_replica_from_ejection(tmp_path: Path) -> None:
    """A.4: 503, 429, 503, ... in a row is a failure streak; the 429s do not reset it."""
    answers = iter([503, 429] * 10)

    async def flaky(request: web.Request) -> web.Response:
        return web.json_response({"error": {"type": "x", "message": "x"}}, status=next(answers))

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", flaky)
    path = tmp_path / "g.yaml"
    async with serve(app) as url:
        config = {
            "replicas": [{"url": url}],
            "retries": {"max_attempts": 1, "retry_on": ["connect_error"]},
            "outlier_detection": {"consecutive_failures": 3, "max_ejected_percent": 100},
        }
        write_config(path, config)
        async with running_gateway(path) as gw, aiohttp.ClientSession() as client:
            for _ in range(6):
                async with client.get(f"{gw.url}/x") as response:
                    await response.read()
            replica = gw.state.pool.all()[0]
            assert replica.ejected_until > 0, "three 503s with 429s between them must eject"
            assert replica.latency_ewma_s == 0.0  # a refusal is not a latency sample


async def test_forwarded_headers_say_what_the_gateway_saw(tmp_path: Path) -> None:
    """B.3: X-Forwarded-Proto/Host are set by the gateway, X-Forwarded-For is appended to."""
    path = tmp_path / "g.yaml"
    async with fake_replicas(1) as replicas:
        write_config(path, gateway_config(replicas, "round_robin"))
        async with running_gateway(path) as gw, aiohttp.ClientSession() as client:
            spoofed = {
                "X-Forwarded-Proto": "https",
                "X-Forwarded-Host": "bank.example",
                "X-Forwarded-For": "10.1.2.3",
            }
            async with client.get(f"{gw.url}/echo", headers=spoofed) as response:
                seen = (await response.json())["headers"]
        assert seen["X-Forwarded-Proto"] == "http"
        assert seen["X-Forwarded-Host"] == gw.url.removeprefix("http://")
        assert seen["X-Forwarded-For"] == "10.1.2.3, 127.0.0.1"


async def test_a_huge_429_body_is_not_held_in_memory(tmp_path: Path) -> None:
    """B.5: a 429 of unknown length is read up to a cap; the client still gets a 429."""

    async def refuse(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(status=429, headers={"Retry-After": "3"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        chunk = b"x" * 65536
        for _ in range(64):  # 4 MiB, more than the gateway will hold
            await response.write(chunk)
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", refuse)
    path = tmp_path / "g.yaml"
    async with serve(app) as url:
        write_config(path, {"replicas": [{"url": url}], "retries": {"max_attempts": 1}})
        async with running_gateway(path) as gw, aiohttp.ClientSession() as client:
            async with client.get(f"{gw.url}/x") as response:
                body = await response.json()
                assert response.status == 429
                assert response.headers["Retry-After"] == "3"
            assert body["error"]["type"] == "upstream_error"
            assert "dropped" in body["error"]["message"]


async def test_targets_that_are_not_paths_never_reach_a_replica(tmp_path: Path) -> None:
    """B.4: CONNECT and asterisk-form targets get a 4xx JSON error; the replica sees nothing."""
    path = tmp_path / "g.yaml"
    async with fake_replicas(1) as replicas:
        write_config(path, gateway_config(replicas, "round_robin"))
        async with running_gateway(path) as gw:
            host, port = gw.url.removeprefix("http://").split(":")
            answers = []
            for line in ("CONNECT 127.0.0.1:9 HTTP/1.1", "OPTIONS * HTTP/1.1"):
                reader, writer = await asyncio.open_connection(host, int(port))
                writer.write(f"{line}\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
                await writer.drain()
                answers.append(await asyncio.wait_for(reader.read(), 5))
                writer.close()
        assert all(a.startswith(b"HTTP/1.1 4") for a in answers), answers
        assert all(b'{"error": {"type": ' in a for a in answers), answers
        assert replicas[0].seen == []


async def test_a_stream_that_ends_in_an_error_event_is_a_replica_failure(tmp_path: Path) -> None:
    """A.5: the client gets the replica's 200 and its error event; the replica gets a failure."""

    async def broken_stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b'data: {"choices": [{"text": "a"}]}\n\n')
        await response.write(b'event: error\ndata: {"error": {"type": "internal_error"}}\n\n')
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", broken_stream)
    path = tmp_path / "g.yaml"
    async with serve(app) as url:
        write_config(path, {"replicas": [{"url": url}]})
        async with running_gateway(path) as gw, aiohttp.ClientSession() as client:
            async with client.post(f"{gw.url}/v1/completions", json={"stream": True}) as response:
                body = await response.read()
                assert response.status == 200
            assert b"event: error" in body and b"[DONE]" not in body
            replica = gw.state.pool.all()[0]
            await wait_until(lambda: replica.outstanding == 0)
            assert (replica.errors_total, replica.consecutive_failures) == (1, 1)
            assert replica.latency_ewma_s == 0.0

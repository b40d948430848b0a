"""The lean front (gateway/app/front.py) as a client sees it: plain proxied requests are served
by it (gateway_lean_requests_total counts them), everything else by aiohttp's server on the
same connection, pipelined requests in order, a slow body a 408, a client that leaves releases
its replica, and an idle connection is closed. Counts end at zero (running_gateway checks)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiohttp

from tests.support.raw_http import connect, read_response
from tests.support.servers import (
    fake_replicas,
    gateway_config,
    metric_sum,
    running_gateway,
    wait_until,
    write_config,
)

BODY = json.dumps({"model": "m", "prompt": "hi"}).encode()


def post(path: str, body: bytes = BODY, extra: str = "") -> bytes:
    head = f"POST {path} HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n{extra}"
    return f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body


def get(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: gw\r\n\r\n".encode()


async def test_one_connection_mixes_lean_and_gateway_paths_in_order(tmp_path: Path) -> None:
    async with fake_replicas(2) as replicas:
        config = gateway_config(replicas, "round_robin", limits={"client_keepalive_s": 5})
        write_config(tmp_path / "g.yaml", config)
        async with running_gateway(tmp_path / "g.yaml") as gw:
            reader, writer = await connect(gw.url)
            # Two proxied requests pipelined in one write, then the gateway's own path, then
            # another proxied one: four answers, in order, on one connection.
            writer.write(post("/v1/completions") + post("/echo?x=1"))
            first, second = await read_response(reader), await read_response(reader)
            writer.write(get("/healthz"))
            health = await read_response(reader)
            writer.write(post("/v1/completions"))
            after = await read_response(reader)
            writer.close()
            async with aiohttp.ClientSession() as client:
                lean = await metric_sum(client, gw.url, "gateway_lean_requests_total")
                handed = await metric_sum(client, gw.url, "gateway_front_handoffs_total")
    assert [first.status, second.status, health.status, after.status] == [200] * 4
    assert first.json()["path"] == "/v1/completions" and second.json()["path"] == "/echo"
    assert second.json()["raw_path"] == "/echo?x=1"
    # The first two by the lean front; /healthz hands the connection (and the fourth request)
    # to aiohttp's server; the metrics scrape is a connection of its own, handed over too.
    assert lean == 2 and handed == 2
    assert {first.headers["x-infergate-replica"], second.headers["x-infergate-replica"]} == {
        r.url for r in replicas
    }
    assert sum(r.in_flight for r in replicas) == 0


async def test_errors_on_the_lean_path_are_json_and_the_connection_goes_on(tmp_path: Path) -> None:
    async with fake_replicas(1) as replicas:
        key = {"name": "a", "key": "sk-front-0123456789abcdef"}
        config = gateway_config(replicas, "round_robin", auth={"api_keys": [key]})
        write_config(tmp_path / "g.yaml", config)
        async with running_gateway(tmp_path / "g.yaml") as gw:
            reader, writer = await connect(gw.url)
            writer.write(post("/v1/completions") + post("/v1/completions", b"{not json"))
            refused, second = await read_response(reader), await read_response(reader)
            writer.close()
    assert refused.status == 401 and "server" not in refused.headers
    assert refused.json()["error"]["type"] == "unauthorized"
    assert refused.headers["content-type"].startswith("application/json")
    assert second.status == 401  # the first one's body was read: the second is a request


async def test_a_slow_body_is_a_408_and_the_connection_closes(tmp_path: Path) -> None:
    async with fake_replicas(1) as replicas:
        config = gateway_config(replicas, "round_robin", timeouts={"client_body_s": 0.3})
        write_config(tmp_path / "g.yaml", config)
        async with running_gateway(tmp_path / "g.yaml") as gw:
            reader, writer = await connect(gw.url)
            writer.write(post("/v1/completions")[:-5])  # the body's last bytes never come
            answer = await read_response(reader)
            rest = await asyncio.wait_for(reader.read(), 5)
            writer.close()
    assert answer.status == 408 and "client_body_s" in answer.json()["error"]["message"]
    assert answer.headers["connection"] == "close" and rest == b""


async def test_a_client_that_leaves_releases_its_replica(tmp_path: Path) -> None:
    async with fake_replicas(1) as replicas:
        write_config(tmp_path / "g.yaml", gateway_config(replicas, "round_robin"))
        async with running_gateway(tmp_path / "g.yaml") as gw:
            _, writer = await connect(gw.url)
            writer.write(post("/hold", b'{"n": 1}'))
            await writer.drain()
            await wait_until(lambda: replicas[0].in_flight == 1)
            assert gw.state.pool.outstanding == 1
            writer.close()
            await wait_until(lambda: gw.state.pool.outstanding == 0)
            replicas[0].release.set()


async def test_an_idle_connection_is_closed_after_client_keepalive_s(tmp_path: Path) -> None:
    async with fake_replicas(1) as replicas:
        config = gateway_config(replicas, "round_robin", limits={"client_keepalive_s": 0.3})
        write_config(tmp_path / "g.yaml", config)
        async with running_gateway(tmp_path / "g.yaml") as gw:
            reader, writer = await connect(gw.url)
            writer.write(post("/v1/completions"))
            answer = await read_response(reader)
            closed = await asyncio.wait_for(reader.read(), 5)  # EOF once idle long enough
            partial_reader, partial = await connect(gw.url)
            partial.write(b"POST /v1/completions HTTP/1.1\r\nHost: gw\r\n")  # never finished
            never = await asyncio.wait_for(partial_reader.read(), 5)
            writer.close()
            partial.close()
    assert answer.status == 200 and closed == b"" and never == b""

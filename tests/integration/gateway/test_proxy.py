"""The proxy as a client sees it: what reaches the replica, what comes back, which errors."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp

from tests.support.servers import (
    fake_replicas,
    gateway_config,
    running_gateway,
    wait_until,
    write_config,
)


async def test_forwards_method_path_query_body_and_headers(tmp_path: Path) -> None:
    async with fake_replicas(1) as (replica,):
        write_config(tmp_path / "g.yaml", gateway_config([replica], "round_robin"))
        async with running_gateway(tmp_path / "g.yaml") as gw, aiohttp.ClientSession() as client:
            headers = {
                "X-Custom": "kept",
                "Connection": "keep-alive, X-Private",
                "X-Private": "dropped: named in Connection",
                "Keep-Alive": "timeout=5",
                "X-Request-Id": "abc-123",
            }
            async with client.put(
                f"{gw.url}/v1/things/%2Fx?a=1&b=two%20words", data=b"payload", headers=headers
            ) as response:
                assert response.status == 200
                body = await response.json()
                assert response.headers["X-Infergate-Replica"] == replica.url
                assert response.headers["X-Request-Id"] == "abc-123"
    assert body["method"] == "PUT"
    assert body["raw_path"] == "/v1/things/%2Fx?a=1&b=two%20words"
    assert body["body"] == "payload"
    seen = {k.lower(): v for k, v in replica.seen[0]["headers"].items()}
    assert seen["x-custom"] == "kept"
    assert seen["x-request-id"] == "abc-123"
    assert seen["x-forwarded-for"] == "127.0.0.1"
    assert "x-private" not in seen and "keep-alive" not in seen
    assert seen["content-length"] == "7"


async def test_generates_request_id_when_absent(tmp_path: Path) -> None:
    async with fake_replicas(1) as (replica,):
        write_config(tmp_path / "g.yaml", gateway_config([replica], "random"))
        async with running_gateway(tmp_path / "g.yaml") as gw, aiohttp.ClientSession() as client:
            ids = set()
            for _ in range(3):
                async with client.get(f"{gw.url}/x") as response:
                    ids.add(response.headers["X-Request-Id"])
    assert len(ids) == 3
    assert {_header(r, "x-request-id") for r in replica.seen} == ids


async def test_unreachable_replica_is_a_502_json_error(tmp_path: Path) -> None:
    async with fake_replicas(1) as (replica,):
        dead_url = replica.url
    write_config(tmp_path / "g.yaml", {"replicas": [{"url": dead_url}]})
    async with running_gateway(tmp_path / "g.yaml") as gw, aiohttp.ClientSession() as client:
        async with client.post(f"{gw.url}/v1/completions", json={}) as response:
            assert response.status == 502
            error = (await response.json())["error"]
    assert error["type"] == "upstream_error"
    assert dead_url in error["message"]


async def test_no_healthy_replica_is_a_503_json_error(tmp_path: Path) -> None:
    async with fake_replicas(2) as replicas:
        for r in replicas:
            r.healthy = False
        check = {"path": "/ping", "interval_s": 0.05, "unhealthy_threshold": 1}
        write_config(tmp_path / "g.yaml", gateway_config(replicas, "random", health_check=check))
        async with running_gateway(tmp_path / "g.yaml") as gw, aiohttp.ClientSession() as client:
            await wait_until(lambda: not gw.state.pool.available())
            async with client.get(f"{gw.url}/readyz") as ready:
                assert ready.status == 503
            async with client.get(f"{gw.url}/anything") as response:
                assert response.status == 503
                assert (await response.json())["error"]["type"] == "no_healthy_replica"
            replicas[1].healthy = True
            await wait_until(lambda: len(gw.state.pool.available()) == 1)
            async with client.get(f"{gw.url}/anything") as response:
                assert response.status == 200
                assert response.headers["X-Infergate-Replica"] == replicas[1].url


async def test_body_over_limit_is_413(tmp_path: Path) -> None:
    async with fake_replicas(1) as replicas:
        config = gateway_config(replicas, "random", limits={"max_body_bytes": 1000})
        write_config(tmp_path / "g.yaml", config)
        async with running_gateway(tmp_path / "g.yaml") as gw, aiohttp.ClientSession() as client:
            async with client.post(f"{gw.url}/x", data=b"x" * 1001) as response:
                assert response.status == 413
                assert "max_body_bytes" in (await response.json())["error"]["message"]

            async def chunks():  # no Content-Length: the limit holds while reading
                for _ in range(20):
                    yield b"y" * 100

            async with client.post(f"{gw.url}/x", data=chunks()) as response:
                assert response.status == 413
            async with client.post(f"{gw.url}/x", data=b"x" * 1000) as response:
                assert response.status == 200
    assert len(replicas[0].seen) == 1


async def test_gateway_paths_are_not_proxied(tmp_path: Path) -> None:
    async with fake_replicas(1) as replicas:
        write_config(tmp_path / "g.yaml", gateway_config(replicas, "random"))
        async with running_gateway(tmp_path / "g.yaml") as gw, aiohttp.ClientSession() as client:
            async with client.get(f"{gw.url}/healthz") as response:
                assert response.status == 200
            async with client.post(f"{gw.url}/healthz") as response:
                assert response.status == 405
                error = (await response.json())["error"]
                assert error["message"] == "/healthz answers GET or HEAD, not POST"
            async with client.get(f"{gw.url}/readyz") as response:
                assert (await response.json()) == {
                    "ready": True,
                    "healthy_replicas": 1,
                    "draining": False,
                    "models_known": True,
                }
            async with client.get(f"{gw.url}/admin/replicas") as response:
                assert response.status == 404  # no admin token configured: admin is off
    assert replicas[0].seen == []


async def test_admin_needs_the_bearer_token(tmp_path: Path) -> None:
    async with fake_replicas(2) as replicas:
        write_config(tmp_path / "g.yaml", gateway_config(replicas, "LEAST_OUTSTANDING_REQUESTS"))
        async with (
            running_gateway(tmp_path / "g.yaml", admin_token="s3cret") as gw,
            aiohttp.ClientSession() as client,
        ):
            for auth in (None, "Bearer wrong", "Basic s3cret", "Bearer s3cre"):
                headers = {"Authorization": auth} if auth else {}
                async with client.get(f"{gw.url}/admin/replicas", headers=headers) as response:
                    assert response.status == 401, auth
            good = {"Authorization": "Bearer s3cret"}
            async with client.get(f"{gw.url}/x") as response:
                assert response.status == 200
            async with client.get(f"{gw.url}/admin/replicas", headers=good) as response:
                state = await response.json()
            async with client.get(f"{gw.url}/admin/nope", headers=good) as response:
                assert response.status == 404
    assert state["strategy"] == "least_outstanding_requests"
    assert sorted(r["url"] for r in state["replicas"]) == sorted(r.url for r in replicas)
    assert sum(r["requests_total"] for r in state["replicas"]) == 1
    assert all(r["outstanding"] == 0 and r["healthy"] for r in state["replicas"])


async def test_metrics_count_requests_per_replica_and_code(tmp_path: Path) -> None:
    async with fake_replicas(1) as replicas:
        write_config(tmp_path / "g.yaml", gateway_config(replicas, "round_robin"))
        async with running_gateway(tmp_path / "g.yaml") as gw, aiohttp.ClientSession() as client:
            for _ in range(3):
                async with client.get(f"{gw.url}/x") as response:
                    await response.read()
            async with client.get(f"{gw.url}/metrics") as response:
                text = await response.text()
    url = replicas[0].url
    assert f'gateway_requests_total{{code="2xx",key="",replica="{url}"}} 3.0' in text
    assert f'gateway_request_duration_seconds_count{{replica="{url}"}} 3.0' in text
    assert f'gateway_outstanding_requests{{replica="{url}"}} 0.0' in text
    assert 'gateway_routing_strategy_info{strategy="round_robin"} 1.0' in text


def _header(record: dict[str, Any], name: str) -> str:
    return next(v for k, v in record["headers"].items() if k.lower() == name)


async def test_absolute_form_target_cannot_choose_the_upstream_host(tmp_path: Path) -> None:
    async with fake_replicas(1) as replicas:
        write_config(tmp_path / "g.yaml", gateway_config(replicas, "random"))
        async with running_gateway(tmp_path / "g.yaml") as gw:
            host, port = gw.url.removeprefix("http://").split(":")
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(
                b"GET http://evil.example.com/steal?x=1 HTTP/1.1\r\n"
                b"Host: evil.example.com\r\nConnection: close\r\n\r\n"
            )
            raw = await asyncio.wait_for(reader.read(), 5)
            writer.close()
            await writer.wait_closed()
    assert raw.startswith(b"HTTP/1.1 200")
    assert replicas[0].seen[0]["raw_path"] == "/steal?x=1"  # went to our replica, path only

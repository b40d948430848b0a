"""The proxy as a client sees it: what reaches the replica, what comes back, which errors."""

from __future__ import annotations

import asyncio
import gzip
import json
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from replica.config import parse_config as parse_replica_config
from replica.keys import STATE as REPLICA_STATE
from replica.server import create_app as create_replica_app
from tests.support.servers import (
    fake_replicas,
    gateway_config,
    running_gateway,
    serve,
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


async def _raw_post(gw_url: str, head: bytes, body: bytes, later: bytes = b"") -> tuple[int, bytes]:
    """A request sent byte for byte; `later` follows once the gateway is reading the body."""
    host, port = gw_url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + head)
    writer.write(b"\r\n" + body)
    if later:
        await writer.drain()
        await asyncio.sleep(0.1)
        writer.write(later)
    # Read by Content-Length, not to EOF: after an answer sent before the body was read,
    # aiohttp lingers to discard the rest before it closes.
    head_bytes = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    status_line, *lines = head_bytes.decode("latin-1").split("\r\n")
    length = next(
        int(v) for k, _, v in (x.partition(":") for x in lines) if k.lower() == "content-length"
    )
    answer = await asyncio.wait_for(reader.readexactly(length), 5)
    writer.close()
    await writer.wait_closed()
    return int(status_line.split(" ", 2)[1]), answer


async def test_a_compressed_body_is_relayed_as_sent_and_bad_framing_is_a_400(
    tmp_path: Path,
) -> None:
    """Issue 30: the gateway does not decompress (aiohttp's own decompression gave a 500 for a
    body that does not decompress, and relayed the plain body still marked gzip); a chunked
    body that breaks its framing mid-way is the client's fault, a 400, never a 5xx."""
    compressed = gzip.compress(b'{"prompt": "hello"}')
    head = b"Content-Encoding: gzip\r\nContent-Length: %d\r\n" % len(compressed)
    async with fake_replicas(1) as (replica,):
        config = gateway_config([replica], "random", timeouts={"client_body_s": 1})
        write_config(tmp_path / "g.yaml", config)
        async with running_gateway(tmp_path / "g.yaml") as gw:
            status, answer = await _raw_post(gw.url, head, compressed)
            assert status == 200, answer  # the replica could undo the gzip: relayed as sent
            assert json.loads(answer)["body"] == '{"prompt": "hello"}'
            chunked = b"Transfer-Encoding: chunked\r\n"
            status, answer = await _raw_post(gw.url, chunked, b"5\r\nhello\r\nzz\r\n")
            assert status == 400, answer  # aiohttp's parser refuses it with the headers
            # Broken once the body is being read: aiohttp's parser drops the body without
            # telling the handler, so the wait ends at timeouts.client_body_s, a 408.
            status, answer = await _raw_post(gw.url, chunked, b"5\r\nhello\r\n", b"zz\r\n")
            assert status == 408, answer
            assert json.loads(answer)["error"]["type"] == "client_timeout", answer
    assert len(replica.seen) == 1


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


async def _raw_get(gw_url: str, target: str) -> tuple[int, bytes]:
    """A request sent byte for byte (a client library would resolve dot segments itself)."""
    host, port = gw_url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    raw = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    await writer.wait_closed()
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


async def test_dot_segments_are_refused_before_any_replica_is_chosen(tmp_path: Path) -> None:
    # Joined under http://host/tenant-a, each would reach tenant-b at a normalising ingress.
    refused = [
        "/../tenant-b/v1/completions",
        "/v1/%2e%2E/%2E./tenant-b/v1/completions",
        "/v1/./completions",
        "/v1/..%2Ftenant-b/v1/completions",
        "/v1/..;/tenant-b",
    ]
    async with fake_replicas(1) as (replica,):
        config = {
            "replicas": [{"url": f"{replica.url}/tenant-a"}],
            "reload": {"poll_interval_s": 1},
        }
        write_config(tmp_path / "g.yaml", config)
        async with running_gateway(tmp_path / "g.yaml") as gw:
            answers = [await _raw_get(gw.url, target) for target in refused]
            fine = await _raw_get(gw.url, "/v2/models/llama-3.1/infer?next=/../x")
            (counted,) = gw.state.pool.all()
    for target, (status, body) in zip(refused, answers, strict=True):
        assert status == 400, target
        error = json.loads(body)["error"]
        assert error["type"] == "invalid_request" and "'..' segment" in error["message"]
    assert fine[0] == 200
    proxied = [r["raw_path"] for r in replica.seen if "/v1/models" not in r["raw_path"]]
    assert [p for p in proxied if not p.endswith("/load")] == [
        "/tenant-a/v2/models/llama-3.1/infer?next=/../x"
    ]
    assert (counted.requests_total, counted.errors_total) == (1, 0)


def _stream_app(texts: list[str]) -> web.Application:
    """A replica streaming completions whose text is each of `texts` in turn, in SSE framed
    every way the spec allows (LF, CRLF, CR; events split across writes); /fail ends a stream
    with an error event, /fail-data with an error object alone (as vLLM sends it)."""

    async def stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for i, text in enumerate(texts):
            chunk = json.dumps({"choices": [{"index": 0, "text": text}]})
            end = ("\n", "\r\n", "\r")[i % 3]
            event = f"data: {chunk}{end}{end}".encode()
            for part in (event[:7], event[7:-1], event[-1:]):  # split mid-line and mid-end
                await response.write(part)
        if request.path == "/fail":
            await response.write(b'event: error\ndata: {"error": {"type": "engine"}}\n\n')
        elif request.path == "/fail-data":
            await response.write(b'data: {"error": {"message": "engine died"}}\n\n')
        else:
            await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", stream)
    return app


async def test_a_stream_fails_by_its_framing_never_by_the_text_a_model_writes(
    tmp_path: Path,
) -> None:
    # A model echoing its prompt writes every marker an error could be told by.
    texts = [
        "event: error",
        '\nevent: error\ndata: {"error": "x"}\n\n',
        'data: {"error": {"message": "no"}}',
        '{"object": "error"}',
        "\r\nevent:error\r\n\r\n",
    ]
    async with serve(_stream_app(texts)) as url:
        config = {
            "replicas": [{"url": url}],
            "reload": {"poll_interval_s": 1},
            "outlier_detection": {"consecutive_failures": 2, "max_ejected_percent": 100},
        }
        write_config(tmp_path / "g.yaml", config)
        async with running_gateway(tmp_path / "g.yaml") as gw, aiohttp.ClientSession() as client:
            (replica,) = gw.state.pool.all()
            for _ in range(10):
                async with client.post(f"{gw.url}/v1/completions", json={}) as response:
                    assert response.status == 200
                    body = await response.read()
            assert body.count(b"event: error") == 2  # relayed as it came: inside the text
            assert replica.consecutive_failures == 0 and not gw.state.pool.is_ejected(replica)
            for path in ("/fail", "/fail-data"):  # a real error event, in either form
                async with client.post(f"{gw.url}{path}", json={}) as response:
                    assert response.status == 200
                    await response.read()
            ejected = gw.state.pool.is_ejected(replica)
    assert ejected


async def test_a_long_idempotency_key_stays_valid_behind_an_api_key(tmp_path: Path) -> None:
    config = {
        "server": {"port": 0},
        "engine": {"kind": "simulated"},
        "models": [{"kind": "tiny-gpt", "name": "m", "max_tokens_limit": 8}],
    }
    app = create_replica_app(parse_replica_config(config))
    keys = [{"name": "team-a", "key": "sk-a"}, {"name": "team-b", "key": "sk-b"}]
    long_key = "k" * 250  # valid at the replica; "team-a/" + it is not
    body = {"model": "m", "prompt": "Hello", "max_tokens": 4, "temperature": 0}
    answers = []
    async with serve(app) as url:
        await app[REPLICA_STATE].settled.wait()
        config = {"replicas": [{"url": url}], "auth": {"api_keys": keys}}
        write_config(tmp_path / "g.yaml", config)
        async with running_gateway(tmp_path / "g.yaml") as gw, aiohttp.ClientSession() as client:
            for key in ("sk-a", "sk-a", "sk-b"):
                headers = {"Authorization": f"Bearer {key}", "Idempotency-Key": long_key}
                async with client.post(
                    f"{gw.url}/v1/completions", json=body, headers=headers
                ) as response:
                    await response.read()
                    answers.append((response.status, response.headers.get("Idempotent-Replayed")))
            too_long = {"Authorization": "Bearer sk-a", "Idempotency-Key": "k" * 256}
            async with client.post(
                f"{gw.url}/v1/completions", json=body, headers=too_long
            ) as response:
                refused = response.status, (await response.json())["error"]["message"]
    # The same key of the same API key is answered again; another API key's is its own.
    assert answers == [(200, None), (200, "true"), (200, None)]
    assert refused[0] == 400 and "Idempotency-Key" in refused[1]

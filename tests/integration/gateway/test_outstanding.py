"""Outstanding-request accounting, and streaming, as seen by clients of a real gateway."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiohttp

from tests.support.servers import (
    fake_replicas,
    gateway_config,
    running_gateway,
    wait_until,
    write_config,
)

ADMIN = {"Authorization": "Bearer t"}


async def test_least_outstanding_keeps_counts_within_one(tmp_path: Path) -> None:
    async with fake_replicas(3) as replicas:
        write_config(tmp_path / "g.yaml", gateway_config(replicas, "least_outstanding_requests"))
        async with (
            running_gateway(tmp_path / "g.yaml", admin_token="t") as gw,
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as client,
        ):
            samples: list[list[int]] = []

            async def sample() -> None:
                while True:
                    async with client.get(f"{gw.url}/admin/replicas", headers=ADMIN) as r:
                        state = await r.json()
                    samples.append([rep["outstanding"] for rep in state["replicas"]])
                    await asyncio.sleep(0.005)

            async def one() -> str:
                async with client.post(f"{gw.url}/hold", json={"n": 1}) as r:
                    assert r.status == 200
                    return r.headers["X-Infergate-Replica"]

            sampler = asyncio.create_task(sample())
            requests = [asyncio.create_task(one()) for _ in range(300)]
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 20
            while sum(r.in_flight for r in replicas) < 300:  # every request reached a replica
                assert loop.time() < deadline, "requests did not all arrive"
                await asyncio.sleep(0.01)
            arrived = len(samples)  # a few more samples of all 300 held, however fast they came
            await wait_until(lambda: len(samples) >= max(arrived + 3, 11))
            sampler.cancel()
            await asyncio.gather(sampler, return_exceptions=True)
            held = [r.in_flight for r in replicas]
            for r in replicas:
                r.release.set()
            served_by = await asyncio.gather(*requests)
            async with client.get(f"{gw.url}/admin/replicas", headers=ADMIN) as r:
                after = [rep["outstanding"] for rep in (await r.json())["replicas"]]
    assert held == [100, 100, 100]
    assert sorted(served_by.count(r.url) for r in replicas) == [100, 100, 100]
    assert len(samples) > 10 and max(samples, key=sum) == [100, 100, 100]
    assert all(max(s) - min(s) <= 1 for s in samples), [s for s in samples if max(s) - min(s) > 1]
    assert after == [0, 0, 0]


async def test_first_sse_event_arrives_while_upstream_still_streams(tmp_path: Path) -> None:
    async with fake_replicas(1) as (replica,):
        write_config(tmp_path / "g.yaml", gateway_config([replica], "random"))
        async with running_gateway(tmp_path / "g.yaml") as gw, aiohttp.ClientSession() as client:
            async with client.get(f"{gw.url}/sse?n=3&gate=1") as response:
                assert response.headers["Content-Type"] == "text/event-stream"
                # The replica sends nothing more until `release`: a buffering proxy times out.
                first = await asyncio.wait_for(response.content.readuntil(b"\n\n"), 5)
                assert json.loads(first.removeprefix(b"data: ")) == {"i": 0}
                assert gw.state.pool.all()[0].outstanding == 1
                replica.release.set()
                rest = await asyncio.wait_for(response.content.read(), 5)
    assert rest.endswith(b"data: [DONE]\n\n")


async def test_client_disconnect_mid_stream_returns_count_to_zero(tmp_path: Path) -> None:
    async with fake_replicas(2) as replicas:
        write_config(tmp_path / "g.yaml", gateway_config(replicas, "least_outstanding_requests"))
        async with running_gateway(tmp_path / "g.yaml") as gw:
            for _ in range(5):
                async with aiohttp.ClientSession() as client:
                    response = await client.get(f"{gw.url}/sse?n=3&gate=1")
                    await asyncio.wait_for(response.content.readuntil(b"\n\n"), 5)
                    assert sum(r.outstanding for r in gw.state.pool.all()) == 1
                    response.close()  # drop the connection mid-stream
                await wait_until(lambda: sum(r.outstanding for r in gw.state.pool.all()) == 0)
            counts = [(r.outstanding, r.requests_total) for r in gw.state.pool.all()]
    assert sorted(c[0] for c in counts) == [0, 0]
    assert sum(c[1] for c in counts) == 5


async def test_upstream_cut_mid_stream_ends_with_an_sse_error_event(tmp_path: Path) -> None:
    async with fake_replicas(1) as replicas:
        write_config(tmp_path / "g.yaml", gateway_config(replicas, "random"))
        async with running_gateway(tmp_path / "g.yaml") as gw, aiohttp.ClientSession() as client:
            received = b""
            async with client.get(f"{gw.url}/sse?n=2&cut=1") as response:
                assert response.status == 200
                try:
                    async for chunk in response.content.iter_any():
                        received += chunk
                    truncated = False
                except aiohttp.ClientPayloadError:
                    truncated = True
            async with client.get(f"{gw.url}/metrics") as response:
                metrics = await response.text()
    assert truncated, "a cut stream must not look complete to the client"
    assert b"data: [DONE]" not in received
    events = [e for e in received.decode().split("\n\n") if e]
    assert events[-1].startswith("event: error\ndata: ")
    error = json.loads(events[-1].split("data: ", 1)[1])["error"]
    assert error["type"] == "upstream_error" and replicas[0].url in error["message"]
    assert f'gateway_requests_total{{code="5xx",key="",replica="{replicas[0].url}"}} 1.0' in metrics

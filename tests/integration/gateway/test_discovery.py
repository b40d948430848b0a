"""DNS discovery through a real gateway: replicas come and go with the A records of a DNS server
the test runs on loopback; added ones get traffic, vanished ones drain with no request dropped,
and a failing DNS server keeps the last good list."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp

from tests.support.dns_server import FakeDns, dns_server
from tests.support.servers import (
    FakeReplica,
    Gateway,
    fake_replica_app,
    running_gateway,
    serve,
    wait_until,
    write_config,
)

NAME = "replicas.infergate.test"
HOSTS = ("127.0.0.2", "127.0.0.3", "127.0.0.4")


def _port_free_on_all(hosts: tuple[str, ...]) -> int:
    """A port every host can bind: a headless Service's pods all listen on the same port."""
    for _ in range(20):
        with socket.socket() as probe:
            probe.bind((hosts[0], 0))
            port: int = probe.getsockname()[1]
        try:
            for host in hosts:
                with socket.socket() as sock:
                    sock.bind((host, port))
        except OSError:
            continue
        return port
    raise AssertionError("no port free on every loopback address")


@asynccontextmanager
async def replicas_on(hosts: tuple[str, ...]) -> AsyncIterator[tuple[int, list[FakeReplica]]]:
    port = _port_free_on_all(hosts)
    replicas = [FakeReplica(host) for host in hosts]
    async with AsyncExitStack() as stack:
        for replica, host in zip(replicas, hosts, strict=True):
            replica.url = await stack.enter_async_context(
                serve(fake_replica_app(replica), port, host)
            )
        yield port, replicas
        for replica in replicas:
            replica.release.set()


def _config(dns: FakeDns, port: int, strategy: str = "round_robin") -> dict[str, Any]:
    return {
        "routing": {"strategy": strategy},
        "discovery": {"dns": NAME, "port": port, "interval_s": 0.1, "nameserver": dns.nameserver},
        "reload": {"poll_interval_s": 0.1},
    }


async def _get(client: aiohttp.ClientSession, url: str) -> tuple[int, str]:
    async with client.get(url) as response:
        await response.read()
        return response.status, response.headers.get("X-Infergate-Replica", "")


def _active(gw: Gateway) -> set[str]:
    return {r.url for r in gw.state.pool.active()}


def _discovery_rounds(gw: Gateway, result: str) -> float:
    value = gw.metrics.registry.get_sample_value(
        "gateway_discovery_resolutions_total", {"result": result}
    )
    return value or 0.0


async def test_replicas_follow_the_dns_records_and_vanished_ones_drain(tmp_path: Path) -> None:
    path = tmp_path / "g.yaml"
    async with (
        replicas_on(HOSTS) as (port, (a, b, c)),
        dns_server({NAME: [HOSTS[0], HOSTS[1]]}) as dns,
    ):
        write_config(path, _config(dns, port))
        async with running_gateway(path) as gw, aiohttp.ClientSession() as client:
            await wait_until(lambda: _active(gw) == {a.url, b.url})
            first = [await _get(client, f"{gw.url}/echo") for _ in range(6)]

            # One request stays in flight on `a` while DNS drops it and adds `c`.
            held = asyncio.create_task(_get(client, f"{gw.url}/hold"))
            await wait_until(lambda: a.in_flight + b.in_flight == 1)
            gone, kept = (a, b) if a.in_flight else (b, a)
            dns.records[NAME] = [kept.url.split("//")[1].split(":")[0], HOSTS[2]]
            await wait_until(lambda: _active(gw) == {kept.url, c.url})
            draining = {r.url: r.draining for r in gw.state.pool.all()}
            second = [await _get(client, f"{gw.url}/echo") for _ in range(6)]
            gone.release.set()
            assert await held == (200, gone.url)
            await wait_until(lambda: {r.url for r in gw.state.pool.all()} == {kept.url, c.url})
    assert first == [(200, url) for url in [first[0][1], first[1][1]] * 3]
    assert {url for _, url in first} == {a.url, b.url}
    assert draining == {gone.url: True, kept.url: False, c.url: False}
    assert sorted(second) == sorted([(200, kept.url), (200, c.url)] * 3)


async def test_failed_resolution_keeps_the_last_list_and_reload_keeps_discovery(
    tmp_path: Path,
) -> None:
    path = tmp_path / "g.yaml"
    async with replicas_on(HOSTS[:2]) as (port, (a, b)), dns_server({NAME: list(HOSTS[:2])}) as dns:
        write_config(path, _config(dns, port))
        async with running_gateway(path) as gw, aiohttp.ClientSession() as client:
            await wait_until(lambda: _active(gw) == {a.url, b.url})
            dns.servfail = True
            errors = _discovery_rounds(gw, "error")
            await wait_until(lambda: _discovery_rounds(gw, "error") >= errors + 3)
            during_outage = await _get(client, f"{gw.url}/echo")
            dns.servfail = False
            dns.records[NAME] = []  # an empty answer is not an empty fleet either
            await asyncio.sleep(0.3)
            after_empty = _active(gw)

            # A config edit swaps the strategy; the discovered list stays (discovery owns it).
            write_config(path, _config(dns, port, strategy="least_outstanding_requests"))
            await wait_until(
                lambda: gw.state.runtime.config.routing.strategy == "least_outstanding_requests"
            )
            after_reload = _active(gw)
            async with client.get(f"{gw.url}/metrics") as response:
                metrics = await response.text()
    assert during_outage[0] == 200
    assert after_empty == after_reload == {a.url, b.url}
    assert 'gateway_discovery_resolutions_total{result="error"}' in metrics
    assert 'gateway_discovery_resolutions_total{result="ok"}' in metrics

"""DNS discovery: addresses to replica URLs, what counts as a failed round (against a DNS
server on loopback), and a round's effect on the pool with the resolver injected."""

from __future__ import annotations

import pytest

from gateway.config import Discovery, parse_config
from gateway.control.discovery import (
    DiscoveryError,
    DnsDiscovery,
    replica_url,
    resolve_addresses,
)
from gateway.pool.live import Live, build_runtime
from gateway.pool.replicas import ReplicaPool
from tests.support.dns_server import dns_server


def test_addresses_become_urls_ipv6_bracketed() -> None:
    spec = Discovery(dns="r", port=9001, scheme="https")
    assert replica_url(spec, "10.0.0.7") == "https://10.0.0.7:9001"
    assert replica_url(spec, "fd00::7") == "https://[fd00::7]:9001"


async def test_unknown_name_and_empty_answer_fail_the_round() -> None:
    async with dns_server({"known": ["127.0.0.9"], "empty": []}) as dns:

        def spec(name: str) -> Discovery:
            return Discovery(dns=name, port=1, nameserver=dns.nameserver, timeout_s=1)

        assert await resolve_addresses(spec("known")) == ["127.0.0.9"]
        with pytest.raises(DiscoveryError, match="cannot resolve unknown"):
            await resolve_addresses(spec("unknown"))
        with pytest.raises(DiscoveryError, match="empty has no A or AAAA record"):
            await resolve_addresses(spec("empty"))


async def test_a_round_swaps_the_pool_and_a_failed_one_keeps_the_last_list(
    caplog: pytest.LogCaptureFixture,
) -> None:
    config = parse_config({"discovery": {"dns": "replicas.local", "port": 9001}})
    live = Live.start(build_runtime(config), ReplicaPool([]))
    live.swap(live.runtime)
    answers: list[list[str] | DiscoveryError] = [
        ["10.0.0.2", "10.0.0.1", "10.0.0.1"],  # duplicates and order do not matter
        DiscoveryError("cannot resolve replicas.local: SERVFAIL"),
        DiscoveryError("cannot resolve replicas.local: SERVFAIL"),
        ["10.0.0.3"],
    ]

    async def resolve(spec: Discovery) -> list[str]:
        answer = answers.pop(0)
        if isinstance(answer, DiscoveryError):
            raise answer
        return answer

    rounds: list[str] = []
    discovery = DnsDiscovery(live, resolve, on_round=rounds.append)
    spec = live.runtime.config.discovery
    assert spec is not None
    await discovery.refresh(spec)
    first = ["http://10.0.0.1:9001", "http://10.0.0.2:9001"]
    assert [r.url for r in live.pool.active()] == first
    await discovery.refresh(spec)
    await discovery.refresh(spec)
    assert [r.url for r in live.pool.active()] == first  # a failed round keeps the list
    assert len([r for r in caplog.records if "SERVFAIL" in r.getMessage()]) == 1  # once a streak
    await discovery.refresh(spec)
    assert [r.url for r in live.pool.active()] == ["http://10.0.0.3:9001"]
    assert rounds == ["ok", "error", "error", "ok"]

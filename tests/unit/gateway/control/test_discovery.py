"""DNS discovery's pure parts: addresses to replica URLs, and what counts as a failed round
(against a DNS server on loopback)."""

from __future__ import annotations

import pytest

from gateway.config import Discovery
from gateway.control.discovery import DiscoveryError, replica_url, resolve_addresses
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

"""DNS discovery against a nameserver that answers junk: the gateway keeps the last list and
serves from it, says so in one log line per bad streak (not one a round), never a traceback."""

from __future__ import annotations

import logging
from pathlib import Path

import aiohttp
import pytest

from tests.integration.gateway.test_discovery import (
    HOSTS,
    NAME,
    _active,
    _config,
    _discovery_rounds,
    _get,
    replicas_on,
)
from tests.support.dns_server import FakeDns, dns_server
from tests.support.servers import running_gateway, wait_until, write_config


def junk(server: FakeDns) -> None:
    """From now on the nameserver answers each query with its id and then garbage."""
    server.answer = lambda wire: wire[:2] + b"\x81\x80\x00\x01\xff\xff" + b"\xc0" * 40  # type: ignore[method-assign]


async def test_a_nameserver_answering_junk_keeps_the_list_and_is_named_once_a_streak(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    path = tmp_path / "g.yaml"
    async with replicas_on(HOSTS[:2]) as (port, (a, b)), dns_server({NAME: list(HOSTS[:2])}) as dns:
        config = _config(dns, port)
        config["discovery"]["timeout_s"] = 0.2
        write_config(path, config)
        good = dns.answer
        async with running_gateway(path) as gw, aiohttp.ClientSession() as client:
            await wait_until(lambda: _active(gw) == {a.url, b.url})
            junk(dns)
            errors = _discovery_rounds(gw, "error")
            await wait_until(lambda: _discovery_rounds(gw, "error") >= errors + 3)
            during = await _get(client, f"{gw.url}/echo")
            complaints = [r for r in caplog.records if NAME in r.getMessage()]
            dns.answer = good  # type: ignore[method-assign]
            ok = _discovery_rounds(gw, "ok")
            await wait_until(lambda: _discovery_rounds(gw, "ok") > ok)
            junk(dns)
            await wait_until(lambda: sum(NAME in r.getMessage() for r in caplog.records) >= 2)
            after = _active(gw)
    assert during[0] == 200
    assert after == {a.url, b.url}
    assert len(complaints) == 1, [r.getMessage() for r in complaints]
    assert complaints[0].levelno == logging.WARNING
    assert not [r.getMessage() for r in caplog.records if r.exc_info]

"""The /admin tree is the gateway's: no spelling of an admin path reaches a replica (it would
carry the admin token there), with or without INFERGATE_ADMIN_TOKEN; `/adminx` is not admin."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import pytest
from yarl import URL

from gateway.server import is_admin_path
from tests.support.servers import fake_replicas, gateway_config, running_gateway, write_config

TOKEN = "admin-secret"
ADMIN_SPELLINGS = (
    "/admin",
    "/admin/",
    "/admin?x=1",
    "/admin/nope",
    "/%61dmin",
    "/admin%2F",
    "//admin",
    "/./admin",
    "/x/../admin/replicas",
)


async def _status(client: aiohttp.ClientSession, url: str, headers: dict[str, str]) -> int:
    # The target is sent as written (no client-side normalisation of dots or escapes).
    async with client.get(URL(url, encoded=True), headers=headers) as response:
        await response.read()
        return response.status


@pytest.mark.parametrize("token", [None, TOKEN])
async def test_no_spelling_of_an_admin_path_is_proxied(tmp_path: Path, token: str | None) -> None:
    async with fake_replicas(1) as (replica,):
        write_config(tmp_path / "g.yaml", gateway_config([replica], "round_robin"))
        async with (
            running_gateway(tmp_path / "g.yaml", admin_token=token) as gw,
            aiohttp.ClientSession() as client,
        ):
            bearer = {"Authorization": f"Bearer {TOKEN}"}
            statuses = {
                path: await _status(client, gw.url + path, bearer) for path in ADMIN_SPELLINGS
            }
            anonymous = await _status(client, gw.url + "/admin", {})
            proxied = await _status(client, gw.url + "/adminx", bearer)
    assert set(statuses.values()) == {404}, statuses  # off, or no such admin endpoint
    assert anonymous == (401 if token else 404)
    assert proxied == 200
    assert [seen["path"] for seen in replica.seen] == ["/adminx"]


def test_admin_paths_are_recognised_after_normalisation() -> None:
    for path in ("/admin", "/admin/", "/admin/reload", "//admin//x", "/a/../admin", "/./admin"):
        assert is_admin_path(path), path
    for path in ("/adminx", "/ADMIN", "/v1/admin", "/x/admin/..", "/", "/v1/completions"):
        assert not is_admin_path(path), path

"""The /admin tree is the gateway's: no spelling of an admin path reaches a replica (it would
carry the admin token there), with or without INFERGATE_ADMIN_TOKEN; `/adminx` is not admin."""

from __future__ import annotations

import logging
from pathlib import Path

import aiohttp
import pytest
from yarl import URL

from gateway.app.checks import is_admin_path
from tests.support.raw_http import exchange
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


async def test_an_admin_token_of_any_bytes_is_a_401(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The bytes after "Bearer " are compared as sent: bytes that are not UTF-8 are a wrong
    # token (401 JSON), never a 500; a token of non-ASCII characters still works.
    token = "admin-sécret"
    async with fake_replicas(1) as (replica,):
        write_config(tmp_path / "g.yaml", gateway_config([replica], "round_robin"))
        async with running_gateway(tmp_path / "g.yaml", admin_token=token) as gw:
            answers = []
            for sent in (b"\x80\xff", b"admin-s\xe9cret", token.encode() + b"\xff", b"\xc3"):
                for target in (b"GET /admin/replicas", b"POST /admin/reload", b"GET /admin/x"):
                    head = b"%s HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s" % (target, sent)
                    answers.append(await exchange(gw.url, head + b"\r\nContent-Length: 0"))
            good = b"GET /admin/replicas HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
            allowed = await exchange(gw.url, good + token.encode())
    assert {(a.status, a.json()["error"]["type"]) for a in answers} == {(401, "unauthorized")}
    assert {a.headers["www-authenticate"] for a in answers} == {"Bearer"}
    assert allowed.status == 200 and allowed.json()["replicas"][0]["url"] == replica.url
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
